"""check() against a plain forward + backward on a CUDA device: time ratio, peak
memory ratio, and where the time goes (profiler: kernel launches, syncs).

Not part of ``make test`` (CI has no GPU).  Usage:
``PYTHONPATH=src python benchmarks/device_check_cost.py OUT_DIR [--rows a,b]``;
writes ``device_check_cost.json`` and ``profile_<row>.txt``.  The four rows are
those of the cost issue: GPT-2 medium bf16 8 x 512, a LLaMA 1.1B config bf16
4 x 1024, MLPs 2000 x 256 and 200 x 1024 in float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import signalprop as sp
from signalprop.lab.models import DeepMLP


def _plain(model: nn.Module, inputs: Any) -> None:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    y = out if isinstance(out, torch.Tensor) else out[0]
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device=y.device).manual_seed(0)
    torch.autograd.grad(y, params, torch.randn(y.shape, generator=g, device=y.device, dtype=y.dtype),
                        allow_unused=True)


def _time(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1000


def _peak(fn: Callable[[], Any]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def _profile(fn: Callable[[], Any], path: Path) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    path.write_text(ev.table(sort_by="self_cpu_time_total", row_limit=30))
    count = {e.key: e.count for e in ev}
    return {"cudaLaunchKernel": count.get("cudaLaunchKernel", 0) + count.get("cuLaunchKernel", 0),
            "cudaStreamSynchronize": count.get("cudaStreamSynchronize", 0),
            "cudaMemcpyAsync": count.get("cudaMemcpyAsync", 0)}


def _models(dev: torch.device) -> dict[str, Callable[[], tuple[nn.Module, Any]]]:
    def gpt2() -> tuple[nn.Module, Any]:
        import transformers

        cfg = transformers.GPT2Config(n_layer=24, n_embd=1024, n_head=16)  # GPT-2 medium
        m = transformers.GPT2LMHeadModel(cfg).to(dev, torch.bfloat16).eval()
        ids = torch.randint(0, cfg.vocab_size, (8, 512), device=dev)
        return m, {"input_ids": ids, "use_cache": False}

    def llama() -> tuple[nn.Module, Any]:
        import transformers

        cfg = transformers.LlamaConfig(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632,
                                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
        m = transformers.LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()
        ids = torch.randint(0, cfg.vocab_size, (4, 1024), device=dev)
        return m, {"input_ids": ids, "use_cache": False}

    def mlp(depth: int, width: int) -> Callable[[], tuple[nn.Module, Any]]:
        def build() -> tuple[nn.Module, Any]:
            # critical init: a trainable deep tanh net (Xavier with tanh's gain is chaotic at this
            # depth and turns non-finite, which times check's exact second pass instead)
            m = DeepMLP(depth, width, "tanh", width, 10).to(dev)
            x = torch.randn(256, width, device=dev)
            sp.init.critical_(m, x, generator=torch.Generator(device=dev).manual_seed(0))
            return m, x

        return build

    return {"gpt2_medium_bf16_8x512": gpt2, "llama_1.1b_bf16_4x1024": llama,
            "mlp_2000x256_fp32": mlp(2000, 256), "mlp_200x1024_fp32": mlp(200, 1024)}


def main(out: Path, rows: list[str] | None, repeat: int) -> dict[str, Any]:
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = torch.device("cuda")
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "targets": {"time_ratio": 1.3, "memory_ratio": 1.1}, "rows": {}}
    for name, build in _models(dev).items():
        if rows and name not in rows:
            continue
        torch.manual_seed(0)
        model, inputs = build()

        def ours(model: Any = model, inputs: Any = inputs) -> Any:
            return sp.check(model, inputs)

        def ref(model: Any = model, inputs: Any = inputs) -> None:
            _plain(model, inputs)

        ours(), ref()  # warm-up (kernels, allocator)
        a, b = [], []
        for _ in range(repeat):  # interleaved: the same machine noise for both
            a.append(_time(ours))
            b.append(_time(ref))
        mem_ref, mem_ours = _peak(ref), _peak(ours)
        prof = _profile(ours, out / f"profile_{name}.txt")
        prof_ref = _profile(ref, out / f"profile_{name}_plain.txt")
        r = ours()
        res["rows"][name] = {"check_median_s": statistics.median(a), "plain_median_s": statistics.median(b),
                             "time_ratio": statistics.median(a) / statistics.median(b),
                             "peak_memory_ratio": mem_ours / mem_ref, "rows": len(r.layers), "verdict": r.verdict,
                             "check_profile": prof, "plain_profile": prof_ref}
        print(name, json.dumps(res["rows"][name]), flush=True)
        del model, inputs, r
        torch.cuda.empty_cache()
    (out / "device_check_cost.json").write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", default="")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    main(a.out, [r for r in a.rows.split(",") if r], a.repeat)
    sys.exit(0)
