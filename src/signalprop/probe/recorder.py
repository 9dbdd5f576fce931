"""Hooks that turn one forward/backward pass into per-call statistics.

Every leaf module that runs is recorded, in execution order (a module called
twice gives two rows).  Activations called as functions inside a forward
(``torch.tanh(x)``, ``F.gelu(x)``, ``x.relu()``) are recorded too, through a
``TorchFunctionMode``; inside a leaf module they are part of that module.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode

from .. import activations as _act
from .. import formats
from ..layers import feature_dim, parametrizations
from ..records import FORMATS
from ..statistics import HEADROOM, Statistic, kernels
from . import attention
from . import stats as S
from .inputs import in_own_pass


def role_of(name: str, kind: str, module: nn.Module | None, shape: tuple[int, ...],
            positional: frozenset[str] = frozenset()) -> str:
    """A row's position in a repeated block: its name with every numeric path
    component that indexes repeated blocks as ``#`` (``layers.#.self_attn.q_proj``;
    ``ln_1`` and ``ln_2`` stay apart), its class and its parameter shapes
    (or, without parameters, its output's shape past the batch dimension), so
    that rows of one role differ only by which block they are in.  An index
    into a container in ``positional`` (see :func:`positional_containers`)
    is a position inside the block and stays: ``blocks.#.0`` and ``blocks.#.2``,
    a block's first and second Linear, are two roles, not one series that
    alternates between them."""
    ps = [p.shape for p in module._parameters.values() if p is not None] if module is not None else []
    sig = ";".join("x".join(map(str, p)) for p in ps) if ps else "x".join(map(str, shape[1:]))
    if positional:
        parts = name.split(".")
        path = [c if not _DIGITS.fullmatch(c) or ".".join(parts[:i]) in positional else "#"
                for i, c in enumerate(parts)]
        return f"{'.'.join(path)}|{kind}|{sig}"
    return f"{_NUMBERED.sub('#', name)}|{kind}|{sig}"


def positional_containers(named: list[tuple[str, nn.Module]]) -> frozenset[str]:
    """Names of the repeated blocks whose numbered children are of different
    classes (``blocks.3 = Sequential(Linear, GELU, Linear)``, one of several
    Sequentials in ``blocks``): their indices are positions within the block,
    not repeats.  A chain that is not itself one of several alike (an
    ``nn.Sequential`` MLP, at the top or as one stage of a model) is not one:
    its layers are the repeats (a chain named inside each block,
    ``blocks.3.mlp``, too: see ``diagnose._block_steps`` for how its series is read)."""
    modules = dict(named)
    out = set()
    for name, m in named:
        if not m._modules:  # a leaf (most modules of a deep net): no positions inside
            continue
        parent, _, last = name.rpartition(".")
        if not _DIGITS.fullmatch(last):
            continue
        kinds = {type(c) for k, c in m._modules.items() if c is not None and _DIGITS.fullmatch(k)}
        if len(kinds) < 2:
            continue
        up = modules.get(parent)
        alike = sum(1 for k, c in (up._modules.items() if up is not None else ())
                    if _DIGITS.fullmatch(k) and type(c) is type(m))
        if alike > 1:
            out.add(name)
    return frozenset(out)


_DIGITS = re.compile(r"\d+")
_NUMBERED = re.compile(r"(?<![^.])\d+(?![^.])")  # a path component that is all digits (ASCII or not)


def first_float_tensor(obj: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a (nested) output: tensors, tuples,
    lists, dicts (HuggingFace ``ModelOutput`` is one) and dataclasses."""
    return next(_float_tensors(obj), None)


def _float_tensors(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """The floating-point tensors of a (nested) output, in order."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
        return
    if _depth > 6:
        return
    if isinstance(obj, dict):
        items: Iterator[Any] = iter(obj.values())
    elif isinstance(obj, (tuple, list)):
        items = iter(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = (getattr(obj, f.name) for f in dataclasses.fields(obj))
    else:
        return
    for v in items:
        yield from _float_tensors(v, _depth + 1)


def model_output(obj: Any) -> torch.Tensor | None:
    """The tensor that stands for a model's output: its ``logits`` (HF
    ``ModelOutput``, a dict), else its first floating tensor that is not a
    0-d scalar -- a model called with ``labels=`` returns its loss first,
    whose gradient (1) says nothing of the output's --, else the first."""
    y = getattr(obj, "logits", None)
    if not isinstance(y, torch.Tensor) and isinstance(obj, dict):
        y = obj.get("logits")
    if isinstance(y, torch.Tensor) and y.is_floating_point():
        return y
    first = None
    for t in _float_tensors(obj):
        if t.dim() > 0:
            return t
        first = first if first is not None else t
    return first


@dataclass(slots=True)
class Row:
    """Raw record of one call; statistics are 0-d tensors until finalised."""

    index: int
    name: str
    kind: str
    depth: int
    shape: tuple[int, ...]
    module: nn.Module | None
    act: _act.Activation | None  # the exact activation this row computes, if it is one
    role: str = ""
    input_second_moment: float | None = None
    fwd: dict[str, Any] = field(default_factory=dict)  # 0-d tensors, floats, or S.Part of a batch
    bwd: dict[str, Any] = field(default_factory=dict)
    # exact mode only: which tensors the call read and wrote (to find the
    # module whose backward turned a finite gradient non-finite)
    inputs: list[Any] = field(default_factory=list)
    inputs_finite: list[Any] = field(default_factory=list)  # exact pass: per input, a 0-d bool on its device
    output: Any = None
    # storage addresses of the call's first floating input and of its output: consecutive rows where
    # one's input is not the previous one's output (a view of it counts) have an operation between
    # them that no row recorded (pooling written as x.mean(...), a residual sum) -- the theory
    # column stops there (see predict._chain)
    src: int = 0
    dst: int = 0
    ver: int = -1  # the output's version counter when the call returned (see Recorder._read)
    in_shape: tuple[int, ...] | None = None  # the first floating input's shape (a convolution's borders: predict)
    wants_grad: bool = False  # the output required grad when the call ran (a gradient hook is on it)
    # the statistics of a backward with create_graph=True that passed through, kept aside from ``bwd``: the
    # loss's own (backward(create_graph=True), for a Hessian-vector product) or a derivative the loss is built
    # from (a PINN's du/dt, a gradient penalty); either way it fills no .grad the monitor can watch, and only a
    # pass no other backward reached takes them (see Recorder.batched)
    bwd_graph: dict[str, Any] = field(default_factory=dict)
    # a backward without create_graph that fills no .grad reached the row after one with it (``bwd_graph``
    # filled): 1; 2 when the module's parameters' .grad then held a graph -- the create_graph backward was the
    # loss's own (``backward(create_graph=True)``) and this one runs through its gradients (a Hessian-vector
    # product).  Counted in the monitor's recorder only (see _count_backward)
    after_graph: int = 0
    # the backwards that filled .grad since it was last empty and reached the row: more than 1 where the loop
    # called backward() on several losses of one forward (retain_graph=True) -- .grad holds their sum, the
    # row's statistics the last one's (the monitor's recorder only)
    bwd_calls: int = 0
    low: bool = False  # the output was in a low-precision format (float16, bfloat16, FP8)
    # the output is a view of the call's input, left as it is (see Recorder._leaf_post): an in-place op on it
    # after the call (ReLU(inplace=True)) moves its history, and its gradient hook never fires
    aliased: bool = False


# torch's dtypes of the low-precision formats (float16, bfloat16, FP8): a set, tested once a row
_LOW_DTYPES = frozenset(getattr(torch, n) for n in FORMATS if formats.name_of(getattr(torch, n, None)) == n)

# Modules that compute their children functionally (MultiheadAttention never
# calls its out_proj as a module): recorded as one row, their children not.
FUSED = (nn.MultiheadAttention,)


def compiled(m: nn.Module) -> bool:
    """Whether ``m`` is a ``torch.compile``'d module (its ``OptimizedModule``
    wrapper): recorded as one row, its inside left alone -- hooks inside it
    would be traced into its compiled code (dynamo raised on them)."""
    return type(m).__name__ == "OptimizedModule" and isinstance(getattr(m, "_orig_mod", None), nn.Module)


def outside_compiled(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``named`` without the modules inside a compiled module."""
    inside = {id(c) for _, m in named if compiled(m) for c in m.modules() if c is not m}
    return [(n, m) for n, m in named if id(m) not in inside] if inside else named


_WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def transformed(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` transform's wrapper (a ``vmap``
    batch, a ``grad`` level): one sample's view of a computation whose
    values the transform holds, which no statistic can be read from (an
    in-place copy of it is refused) -- not measured."""
    return _WRAPPED is not None and bool(_WRAPPED(t))


def register_weakly(register: Callable[[Any], Any], method: Any,
                    wrap: Callable[[Any], Any] | None = None) -> Any:
    """``register`` (one of torch's process-wide module-hook registrations)
    of ``method`` (a bound method, through ``wrap`` when given), holding its
    object weakly; the handle.  A monitor never closed (a notebook cell run
    again, no ``with``) whose next sample was armed left its recorder's
    global hooks registered: they kept the model and the monitor alive, and
    ran on every module call of every model in the process.  Once the object
    is gone the hook removes itself at its next call: torch runs the global
    hooks of a module call from a copy of the registry (these are not
    ``always_call`` hooks, the one loop over the registry itself), where a
    finaliser could run in the middle of anything."""
    ref = weakref.WeakMethod(method)
    box: list[Any] = []

    def hook(*args: Any) -> Any:
        m = ref()
        if m is None:
            if box:
                box.pop().remove()
            return None
        return m(*args)

    fn: Any = wrap(hook) if wrap is not None else hook
    fn._signalprop_hook = True  # (one of ours: see user_global_hooks)
    handle = register(fn)
    box.append(handle)
    return handle


def user_global_hooks() -> bool:
    """Whether process-wide module hooks other than signalprop's own are
    registered (``register_module_forward_hook`` and its kin): they run on
    every module call and may change what it returns or passes back (a
    global forward hook returning ``out * 3``), which nothing on the module
    itself shows."""
    from torch.nn.modules import module as _m

    regs = (_m._global_forward_hooks, _m._global_forward_pre_hooks, _m._global_backward_hooks,
            _m._global_backward_pre_hooks)
    return any(not getattr(h, "_signalprop_hook", False) for reg in regs for h in reg.values())


def _inert(*args: Any, **kwargs: Any) -> None:
    """What a copied or pickled model keeps of a signalprop hook: nothing."""


def _inert_hook() -> Any:
    return _inert


class Hook:
    """A hook that a model holds for a recorder or a monitor (registered on
    one of its modules): called as ``fn``.  A copy of the model
    (``copy.deepcopy``: an EMA copy, ``AveragedModel``) or a pickled one
    (``torch.save(model)``) gets :func:`_inert` in its place -- not a second
    monitor bound to the copy that no one closes, nor a pickling error on
    what the monitor holds."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _inert_hook, ()  # unpickled as _inert

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _inert


def _has_own_children(m: nn.Module) -> bool:
    """Whether ``m`` has children other than the ``parametrizations``
    container that ``torch.nn.utils.parametrize`` adds (weight_norm,
    spectral_norm): a parametrised Linear is still one layer.  Read off the
    ``_modules`` dict (``named_children()`` builds a generator and a set per
    module)."""
    return any(c is not None and n != "parametrizations" and not _quantisation_hook(c) for n, c in m._modules.items())


def _quantisation_hook(m: nn.Module) -> bool:
    """Whether ``m`` is a fake-quantiser or observer of ``torch.ao.quantization``
    (what ``prepare_qat`` puts under a Linear as ``weight_fake_quant`` and
    ``activation_post_process``): part of the layer it sits in, not a layer
    -- a QAT Linear is one row, as a parametrised one is."""
    mod = type(m).__module__ or ""
    if not mod.startswith("torch.ao."):
        return False
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase

    return isinstance(m, (FakeQuantizeBase, ObserverBase))


def leaf_modules(model: nn.Module, named: list[tuple[str, nn.Module]] | None = None) -> list[nn.Module]:
    """The modules recorded as rows: those without children of their own, and
    fused ones (MultiheadAttention) as a whole.  ``named``: the model's
    ``named_modules()`` list when the caller already has it."""
    mods = [m for _, m in (named if named is not None else model.named_modules())]
    # fused (MultiheadAttention), compiled and scripted modules are one row each: what is inside them runs
    # as one computation (a torch.jit.script'ed block's children are compiled code no hook reaches)
    hidden = {id(c) for m in mods if isinstance(m, FUSED) or compiled(m) or isinstance(m, torch.jit.ScriptModule)
              for c in m.modules() if c is not m}
    # parametrize registers its container as a child module (no getattr: a module without one
    # would go through nn.Module.__getattr__'s AttributeError, ~1 us each)
    hidden |= {id(c) for m in mods if (p := parametrizations(m)) is not None
               for c in p.modules()}  # weight computations, not layers
    hidden |= {id(c) for m in mods if _quantisation_hook(m) for c in m.modules()}  # parts of their layers
    if len(mods) == 1 and not _has_own_children(model) and not (type(model).__module__ or "").startswith("torch.") \
            and _class_calls_activation(type(model)):
        # a model of one module of its own class computing with raw parameters (F.linear, torch.tanh): its
        # activation calls are the rows (functional capture), not its one output
        return []
    return [m for m in mods if id(m) not in hidden
            and (isinstance(m, FUSED) or compiled(m) or isinstance(m, torch.jit.ScriptModule)
                 or not _has_own_children(m))]


def _aliases(out: torch.Tensor, args: Any) -> bool:
    """Whether ``out`` shares its storage with a tensor among a call's
    positional arguments (one level into tuples and lists): a view of the
    input, whose base the caller holds."""
    ptr = out.untyped_storage().data_ptr()
    items = args if isinstance(args, (tuple, list)) else (args,)
    for a in items:
        for t in (a if isinstance(a, (tuple, list)) else (a,)):
            if isinstance(t, torch.Tensor) and not t.is_nested and t.untyped_storage().data_ptr() == ptr:
                return True
    return False


def written_after(y: torch.Tensor, rows: list[Row]) -> bool:
    """Whether ``y`` holds values no row measured: no row's output starts
    where it does with its version (made by code after the rows, a view
    of a row's output at an offset, or a row's output written in place
    since)."""
    p, v = _ptr(y), _version(y)
    return not any(r.dst == p and r.ver == v for r in rows)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Floating tensors among a call's positional arguments (one level deep)."""
    items = obj if isinstance(obj, (tuple, list)) else (obj,)
    return [a for a in items if isinstance(a, torch.Tensor) and a.is_floating_point()]


def _input_extremes_into(d: dict[str, Any], args: Any) -> None:
    """The largest and smallest entry of a call's first floating input, when
    no row wrote it (a residual sum or a scaling in a parent's ``forward``):
    a tensor no row outputs would otherwise overflow a low-precision format
    unseen (``input_absmax``).  Left on the device."""
    x = next(iter(_tensors(args)), None)
    if x is None or x.numel() == 0:
        return
    prev = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        d["input_max"], d["input_min"] = x.amax(), x.amin()
    finally:
        torch._C._set_grad_enabled(prev)


def _ptr(t: torch.Tensor) -> int:
    """The address of a tensor's first entry; 0 for one without storage (a
    subclass such as a nested or fake tensor)."""
    try:
        return t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _first_floating(args: Any) -> torch.Tensor | None:
    """A call's first floating tensor argument."""
    for a in args if isinstance(args, (tuple, list)) else (args,):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    return None


def _first_ptr(args: Any) -> int:
    """:func:`_ptr` of a call's first floating tensor argument (0: none)."""
    a = _first_floating(args)
    return _ptr(a) if a is not None else 0


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter (bumped by every in-place write); -1 where it has none (an inference tensor)."""
    try:
        return t._version
    except RuntimeError:
        return -1


_FUNCTION_NAMES: frozenset[str] = frozenset()


def _function_names() -> frozenset[str]:
    """The attribute names under which the table's activations are called as
    functions (``tanh``, ``gelu``, ``relu_``, ...)."""
    global _FUNCTION_NAMES
    if not _FUNCTION_NAMES:
        _FUNCTION_NAMES = frozenset(d.rpartition(".")[2] for a in _act.REGISTRY.values() for d in a.functional) \
            | attention.CODE_NAMES
    return _FUNCTION_NAMES


_CALLS: dict[types.CodeType, bool] = {}  # per code object: may it call an activation function?


def _code_calls_activation(code: types.CodeType, glb: dict[str, Any], depth: int = 0) -> bool:
    hit = _CALLS.get(code)
    if hit is None:
        hit = bool(_function_names() & set(code.co_names)) or any(
            _code_calls_activation(c, glb, depth) for c in code.co_consts if isinstance(c, types.CodeType))
        if not hit and depth < 2:  # module-level helpers the forward calls, two levels down
            for n in code.co_names:
                f = glb.get(n)
                if isinstance(f, types.FunctionType) and not f.__module__.startswith("torch") and \
                        _code_calls_activation(f.__code__, f.__globals__, depth + 1):
                    hit = True
                    break
        _CALLS[code] = hit
    return hit


# per class (held weakly: a class let go takes its answers with it), by code object and depth
_METHOD_CALLS: weakref.WeakKeyDictionary[type, dict[tuple[types.CodeType, int], bool]] = weakref.WeakKeyDictionary()


def _method_calls_activation(cls: type, code: types.CodeType, depth: int = 0) -> bool:
    """Whether a method of ``cls`` that ``code`` names (``self.extract_key_value(...)``,
    HF RWKV) may call an activation as a function, two levels down."""
    try:
        known = _METHOD_CALLS.setdefault(cls, {})
    except TypeError:  # a class that cannot be weakly referenced: asked each time
        known = {}
    hit = known.get((code, depth))
    if hit is None:
        hit = known[(code, depth)] = _scan_methods(cls, code, depth)
    return hit


def _scan_methods(cls: type, code: types.CodeType, depth: int) -> bool:
    for n in code.co_names:
        f = _unwrapped(inspect.getattr_static(cls, n, None))
        if isinstance(f, (staticmethod, classmethod)):
            f = f.__func__
        if not isinstance(f, types.FunctionType) or f.__module__.startswith("torch"):
            continue
        if _code_calls_activation(f.__code__, f.__globals__) or \
                depth < 1 and _method_calls_activation(cls, f.__code__, depth + 1):
            return True
    return False


def _unwrapped(f: Any) -> Any:
    # functools.partialmethod: the function it binds (``_partialmethod`` before Python 3.13)
    pm = getattr(f, "__partialmethod__", None) or getattr(f, "_partialmethod", None)
    if pm is not None and callable(getattr(pm, "func", None)):
        f = pm.func
    try:
        return inspect.unwrap(f)
    except ValueError:  # a __wrapped__ cycle
        return f


# per class: its forward when asked (weakly) and the answer; a class let go takes its entry with it (torch.fx
# makes a class per traced module), a forward replaced or made anew at each access is asked again
_CLASS_CALLS: weakref.WeakKeyDictionary[type, tuple[weakref.ref[Any], bool]] = weakref.WeakKeyDictionary()


def _base_calls_activation(cls: type, code: types.CodeType) -> bool:
    """Whether a forward that reaches its base class's (``super().forward(...)``,
    ``Base.forward(self, ...)``: a subclass of an HF attention module) reaches
    one that may call an activation as a function."""
    if "super" not in code.co_names and "forward" not in code.co_names:
        return False
    for base in cls.__mro__[1:]:
        if base is nn.Module or (base.__module__ or "").startswith("torch."):
            break
        if "forward" in vars(base):
            return _class_calls_activation(base)
    return False


def _class_calls_activation(cls: type) -> bool:
    """Whether ``cls.forward`` (or a method or helper it calls) may call an
    activation as a function; forwards without Python code count as calling one."""
    forward = cls.forward  # type: ignore[attr-defined]
    known = _CLASS_CALLS.get(cls)
    if known is not None and known[0]() is forward:
        return known[1]
    f = _unwrapped(forward)  # the function a decorator (HF's kernel hub, say) wraps
    fwd = getattr(f, "__code__", None)
    hit = fwd is None or _code_calls_activation(fwd, f.__globals__) or _method_calls_activation(cls, fwd) or \
        _base_calls_activation(cls, fwd)
    try:
        _CLASS_CALLS[cls] = (weakref.ref(forward), hit)
    except TypeError:  # a class or a forward that cannot be weakly referenced: asked each time
        pass
    return hit


def functional_callers(model: nn.Module, leaves: list[nn.Module] | None = None,
                       named: list[tuple[str, nn.Module]] | None = None) -> set[nn.Module]:
    """The non-leaf modules whose ``forward`` may call an activation or an
    attention as a function (``torch.tanh(x)``, ``F.gelu(x)``, ``x.relu()``,
    ``F.scaled_dot_product_attention``): read off the names its code (and
    the module-level helpers it calls) refers to, and the functions stored on
    the module (``self.act = torch.tanh``).  The ``TorchFunctionMode`` that
    records such calls costs a Python call per torch op, so it runs only
    while one of these modules runs (an HF model's attention modules, not its
    embedding, masks and MLPs).  Conservative: forwards without Python code
    count as calling one."""
    fns = _act.torch_functions()
    leaf_ids = set(map(id, leaves if leaves is not None else leaf_modules(model, named)))
    out: set[nn.Module] = set()
    for _, m in named if named is not None else model.named_modules():
        if id(m) in leaf_ids or isinstance(m, torch.jit.ScriptModule):  # (scripted code calls no Python torch function)
            continue
        if _class_calls_activation(type(m)):
            out.add(m)
            continue
        for v in vars(m).values():
            target = v.func if isinstance(v, functools.partial) else v
            # only a function can be one (a module's dicts of parameters and hooks are not even hashable:
            # asking raised a TypeError each, 0.1 ms a call on a 40-module model)
            if isinstance(target, (types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType)) \
                    and target in fns:
                out.add(m)
                break
    return out


def calls_functional_activations(model: nn.Module, leaves: list[nn.Module] | None = None,
                                 named: list[tuple[str, nn.Module]] | None = None) -> bool:
    """Whether any non-leaf module's ``forward`` may call an activation as a
    function (see :func:`functional_callers`)."""
    return bool(functional_callers(model, leaves, named))


def _leave(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off torch's function-mode stack wherever it is: on top
    when the forward that entered it returned; below modes the user entered
    after it when that forward never returned (a KeyboardInterrupt, for
    which torch runs no hook) -- those stay, in their order (``__exit__``
    pops the top, whichever mode it is)."""
    above = []
    while torch._C._len_torch_function_stack():
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)


class _ScopedCapture:
    """The context of a pass that records functional calls: the recording
    mode (:class:`_FunctionalCapture`) is entered when one of the modules
    that may make such calls starts and left when the outermost of them
    returns (see :func:`functional_callers`); leaving this context leaves
    the mode too, where a forward that raised left it entered."""

    def __init__(self, recorder: Recorder) -> None:
        self.r = recorder
        self.mode = _FunctionalCapture(recorder)
        self.depth = 0

    def __enter__(self) -> _ScopedCapture:
        self.r._scope = self
        # entered inside a forward already running (the monitor's root pre-hook): the callers on the
        # module stack are running, their returns pop the mode
        for name in self.r.stack:
            if name in self.r._caller_names:
                self.push()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.r._scope = None
        if self.depth:
            self.depth = 0
            _leave(self.mode)

    def push(self) -> None:
        if not self.depth:
            self.mode.__enter__()
        self.depth += 1

    def pop(self) -> None:
        if self.depth:
            self.depth -= 1
            if not self.depth:
                _leave(self.mode)

    def lift(self) -> bool:
        """Take the recording mode off the top of torch's mode stack while
        the recorder's own hook runs (its ~10 tensor calls a row would each
        pass through the mode: ~240 Python calls per check of a two-layer HF
        model); False where the mode is not on top (a mode the user entered
        inside the forward stays as it is)."""
        n = torch._C._len_torch_function_stack()
        if not self.depth or not n or torch._C._get_function_stack_at(n - 1) is not self.mode:
            return False
        torch._C._pop_torch_function_stack()
        return True

    def restore(self) -> None:
        torch._C._push_on_torch_function_stack(self.mode)


class _FunctionalCapture(TorchFunctionMode):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.r = recorder
        self.fns = _act.torch_functions()
        self.attn = attention.functions()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.r.busy:  # the recorder's own computation inside a forward hook: not the model's
            return out
        kind = self.attn.get(func)
        if (kind is not None or func in self.fns) and self.r.running is not None and not self.r.running():
            return out  # the forward that entered the mode never returned: the calls after it are not the model's
        # inside nn.MultiheadAttention its own row measures the attention (Recorder._fused_attention)
        if isinstance(out, torch.Tensor) and out.is_nested:
            return out  # torch's fused path for a packed batch (a frozen encoder in eval mode): no row there
        if isinstance(out, torch.Tensor) and transformed(out):  # inside torch.func.vmap/grad: not measured
            self.r.transformed += 1
            return out
        try:
            if kind is not None and self.r.stats and isinstance(out, torch.Tensor) and \
                    not (self.r.stack and self.r.stack[-1] in self.r._fused_names):
                self._attention(kind, args, kwargs, out)
                return out
            name = self.fns.get(func) if self.r.leaf_depth == 0 else None
            if name is not None and isinstance(out, torch.Tensor):
                parent = self.r.stack[-1] if self.r.stack else ""
                self.r.record(f"{parent}.{name}" if parent else name, f"F.{name}", None,
                              _act.from_call(name, args, kwargs), out, args)
        except Exception as e:  # a guest in the user's forward (the monitor's) never raises into it
            if not self.r.safe:
                raise
            self.r.errors.append(e)
        return out

    def _attention(self, kind: str, args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> None:
        """A row for one attention computation: its output's statistics and
        its logits' (see :mod:`.attention`), named after the module computing it."""
        try:
            stats = attention.measure(kind, args, kwargs)
        except Exception as e:  # an attention call of a shape not foreseen: the row goes without its logits
            if not self.r.safe:
                raise
            self.r.errors.append(e)
            return
        if stats is None:
            return
        parent = self.r.stack[-1] if self.r.stack else ""
        row = self.r.record(f"{parent}.attention" if parent else "attention",
                            "F.scaled_dot_product_attention" if kind == "sdpa" else "F.softmax", None, None, out, args)
        row.fwd.update(stats)


def _nested_arg(args: Any) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_nested for a in args)


def _grad_hook(row: Row, exact: bool | S.GradBatches, g: torch.Tensor, kernels: list[Statistic] | None = None) -> None:
    """A row's gradient statistics, from the gradient with respect to its
    output.  ``exact``: True for the exact pass; the pass's
    :class:`~.stats.GradBatches` to copy a small gradient into, to be reduced
    with others (one op here instead of three)."""
    # a create_graph backward (see Row.bwd_graph): kept aside
    d = row.bwd_graph if builds_graph(g) else row.bwd
    # hooks run without grad mode unless the backward builds a graph (create_graph=True)
    prev = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        if exact is True:
            d.update(S.exact_moments(g, "grad", kernels=kernels))
        elif exact is not False and S.Batches.fits(g):
            exact.add(d, g)
        else:
            S.grad_moments_into(d, g, kernels)
    finally:
        torch._C._set_grad_enabled(prev)


def builds_graph(g: torch.Tensor) -> bool:
    """Whether the backward that passes the gradient ``g`` to a hook builds a
    graph (``create_graph=True``): hooks run without grad mode otherwise, and
    ``g`` then requires no grad."""
    return g.requires_grad or torch.is_grad_enabled()


def _count_backward(row: Row, g: torch.Tensor) -> None:
    """Which backward reached ``row`` (the monitor's recorder: training may run
    several): read from a trainable parameter of the row's module, whose
    ``.grad`` this backward will fill or not -- ``torch.autograd.grad`` fills
    none (a PINN's du/dt, a saliency map, a Hessian-vector product), and the
    module's own parameters are filled after the row's gradient passes.

    * A backward that fills ``.grad`` counts in ``row.bwd_calls``, from 0
      again where ``.grad`` is empty (zeroed since the last one: a GAN's
      discriminator and generator losses through one fake batch).
    * One that fills none, after a ``create_graph`` backward filled ``.grad``
      with a graph, runs through the loss's gradients (a Hessian-vector
      product): ``row.after_graph`` 2 (see ``Row.after_graph``).

    Rows without parameters of their own are not counted (the rows of a
    module that holds a weight decide)."""
    m = row.module
    p = next((q for q in m._parameters.values() if q is not None and q.requires_grad and q.is_leaf),
             None) if m is not None else None
    if p is None:
        return
    try:
        fills = bool(torch._C._will_engine_execute_node(get_gradient_edge(p).node))
    except RuntimeError:  # refused under torch.autograd.grad with p among its inputs: it fills no .grad
        fills = False
    except Exception:  # (a torch without this engine query, a tensor subclass it refuses): not told apart
        return
    if fills:
        row.bwd_calls = 1 if p.grad is None else row.bwd_calls + 1
    elif not builds_graph(g) and row.bwd_graph and not row.after_graph:
        row.after_graph = 2 if p.grad is not None and p.grad.requires_grad else 1


def _grad_prehook(row: Row, exact: bool | S.GradBatches, nr: int, grads: tuple[torch.Tensor | None, ...],
                  kernels: list[Statistic] | None = None) -> None:
    """:func:`_grad_hook` as a pre-hook of the autograd node that produced a
    row's output (its ``nr``-th output): the engine calls it with the
    gradients of the node's outputs, after any tensor hooks on them, so it
    sees what a tensor hook registered on the output would -- also when the
    output is modified in place later (the node is the one before that op).
    Registering it measured 6.5 us per row inside a forward against 13 us for
    ``Tensor.register_hook`` (which builds a handle and a hook dict in Python)."""
    g = grads[nr]
    if g is not None:
        _grad_hook(row, exact, g, kernels)


def _batched_prehook(batches: S.GradBatches, row: Row, nr: int, grads: tuple[torch.Tensor | None, ...]) -> None:
    """:func:`_grad_prehook` of a pass that batches small gradients (check's),
    with the common case first: a backward that builds no graph runs its
    hooks with grad mode off already (nothing to switch) and a small
    gradient is copied into its batch -- about half the Python of the general
    hook, on every row of a deep net.  Anything else goes the general way."""
    g = grads[nr]
    if g is None:
        return
    if g.requires_grad or torch.is_grad_enabled() or not S.Batches.fits(g):
        _grad_hook(row, batches, g, batches.kernels)
    else:
        batches.add(row.bwd, g)


def _safe_grad_hook(errors: list[BaseException], row: Row, exact: bool | S.GradBatches, g: torch.Tensor,
                    kernels: list[Statistic] | None = None) -> None:
    """:func:`_grad_hook` whose failure is kept in ``errors`` (a recorder's
    ``safe`` mode: the monitor's, which also tells the backwards apart, see
    :func:`_count_backward`)."""
    try:
        _count_backward(row, g)
        _grad_hook(row, exact, g, kernels)
    except Exception as e:
        errors.append(e)


def _safe_grad_prehook(errors: list[BaseException], row: Row, exact: bool | S.GradBatches, nr: int,
                       grads: tuple[torch.Tensor | None, ...], kernels: list[Statistic] | None = None) -> None:
    """:func:`_grad_prehook` whose failure is kept in ``errors`` (see :func:`_safe_grad_hook`)."""
    try:
        g = grads[nr]
        if g is not None:
            _count_backward(row, g)
        _grad_prehook(row, exact, nr, grads, kernels)
    except Exception as e:
        errors.append(e)


# The horizon counts the time steps whose input gradient is within this factor of the largest step's:
# the lower end of the verdict's default healthy range (Dive into Deep Learning's [1e-6, 1e3])
TIME_HORIZON_FLOOR = 1e-6


def _time_hook(row: Row, tdim: int, exact: bool, g: torch.Tensor,
               packed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Per time step t, the RMS of the gradient reaching a recurrent module's
    input x_t: their smallest over their largest (``time_grad_ratio``: the
    loss on the last step makes the first steps' gradient a product of t
    recurrent Jacobians), the number of steps within
    :data:`TIME_HORIZON_FLOOR` of the largest (``time_horizon``) and the
    sequence's length.  Left on the device.  ``packed``: ``g`` is a
    ``PackedSequence``'s data (time-major), with the step of each of its rows
    and the number of sequences still running at each step; each step's RMS
    is over the sequences that have it, so that a batch of sequences that end
    early does not read as a gradient fading toward the end."""
    prev = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        if exact:
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        a = S.acc(g)
        if packed is None:
            r = torch.linalg.vector_norm(g, dim=tuple(d for d in range(g.dim()) if d != tdim), dtype=a)
        else:
            steps, sizes = packed
            sq = torch.zeros(len(sizes), dtype=a, device=g.device).index_add_(
                0, steps, g.reshape(g.shape[0], -1).to(a).square().sum(1))
            r = (sq / (sizes.to(a) * max(g[0].numel(), 1))).sqrt()
        top = r.amax()
        row.bwd["time_grad_ratio"] = torch.where(top > 0, r.amin() / top, torch.ones_like(top))
        row.bwd["time_horizon"] = (r >= top * TIME_HORIZON_FLOOR).sum(dtype=r.dtype)
        row.bwd["time_steps"] = float(r.shape[0])
    finally:
        torch._C._set_grad_enabled(prev)


def _safe_time_hook(errors: list[BaseException], row: Row, tdim: int, exact: bool, g: torch.Tensor,
                    packed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    try:
        _time_hook(row, tdim, exact, g, packed)
    except Exception as e:
        errors.append(e)


def _weights_into(d: dict[str, Any], m: nn.Module) -> None:
    """The low-precision counts over a module's own parameters together
    (``weight_lp*``, see :mod:`signalprop.formats`) and their largest |entry|
    (``weight_max``), left on the device."""
    from .distributed import local

    ps = [local(p.detach()) for p in m._parameters.values() if p is not None and p.is_floating_point()]
    cs = [c for c in map(formats.counts, ps) if c is not None]
    if not cs:
        return
    total = cs[0] if len(cs) == 1 else torch.stack(cs).sum(0)
    d.update(zip(formats.keys("weight"), total.unbind()))
    tops = torch._foreach_norm(ps, math.inf)
    d["weight_max"] = tops[0] if len(tops) == 1 else torch.stack(tops).amax()


def _traits(act: _act.Activation | None) -> tuple[tuple[float, float] | None, bool, bool]:
    """What the statistics need to know of a row's activation: its saturation
    band, whether it is a rectifier (its units' dead flags are measured; a
    GELU row whose every output is 0 is dead too: see ``rows._dead``), and
    whether its outputs are >= 0."""
    if act is None:
        return None, False, False
    return _act.saturation_band(act), act.rectifier, _act.nonnegative(act)


# torch's leaf modules whose forward computes attention weights (a softmax over scores, SDPA): the
# recording mode stays on inside them (see _FunctionalCapture._attention)
_WEIGHING = (nn.Softmax, nn.Softmin, nn.Softmax2d, nn.MultiheadAttention)  # (softmin: a softmax of -x)


def _own_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward hooks of its own (which run inside its call)."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


class _Leaf(NamedTuple):
    """What a leaf module's rows share on every call, worked out once per pass
    (a named tuple: thousands are made per pass)."""

    name: str
    kind: str
    act: _act.Activation | None
    band: tuple[float, float] | None  # saturation band of a bounded activation
    rectifier: bool
    nonnegative: bool  # a rectifier whose outputs are >= 0 (ReLU): one reduction finds its dead units
    feature_dim: int | None  # set by weight layers: units along -1 (Linear) or 1 (convolutions)
    role: str | None  # None: depends on the output's shape (no parameters)
    # run with the recording mode taken off (see Recorder._pre): a compiled module, or one of torch's own
    # leaves that computes no attention weights and has no hooks of its own
    lifted: bool


class Recorder:
    """``attach()`` to a model, run it (inside :meth:`functional_mode` when
    that is not None), ``detach()``; ``rows`` holds one :class:`Row` per call,
    its statistics filled in by the forward hooks and, during backward, by
    the gradient hooks on each row's output (pre-hooks of the autograd node
    that made it, see :func:`_grad_prehook`)."""

    def __init__(self, model: nn.Module, *, capture_functional: bool = True, stats: bool = True,
                 track_inputs: bool = False, exact: bool = False, unit_vectors: bool = False,
                 named: list[tuple[str, nn.Module]] | None = None, safe: bool = False,
                 capture_budget: int = 0, precision: bool = False, headroom: bool = True) -> None:
        """``stats=False`` records only the call sequence (activation detection);
        ``track_inputs`` also records each weight layer's input second moment;
        ``exact`` masks non-finite entries and counts them, and remembers which
        tensors each call read and wrote (the slow path after a NaN/Inf);
        ``unit_vectors`` keeps each rectifier row's per-unit alive flags rather
        than their count (to be combined across ranks); ``named``:
        ``list(model.named_modules())`` when the caller has it already.
        ``safe``: a failure inside any of the recorder's hooks (forward or
        gradient) is kept in ``errors`` instead of raised into the model's
        forward or backward pass (the monitor, a guest in a training loop,
        then skips the sample); KeyboardInterrupt and other non-``Exception``
        signals pass through.  ``capture_budget``: bytes of small outputs
        whose gradients the caller's own backward captures (see
        :meth:`captured`) instead of a gradient hook per row; 0 (the monitor,
        whose backward is the user's) hooks every row.
        ``precision``: also count, per row, the
        output's, its gradient's and the module's weights' entries that
        would overflow or underflow low-precision formats (the statistics
        declared with option "precision"; :mod:`signalprop.formats`).
        ``headroom=False``: leave out each row's largest |output| and
        |gradient| (:data:`signalprop.statistics.HEADROOM`), for a pass
        computing in float32/float64, whose range no value comes near: on
        the CPU they are two reductions a row that the pass otherwise does
        not need (7% of a plain step of a 100 x 512 tanh MLP, measured)."""
        self.model = model
        self.safe = safe
        self.errors: list[BaseException] = []
        self.transformed = 0  # calls inside torch.func transforms, not measured (see transformed())
        # exact mode: whether each non-leaf module's output held a NaN/Inf (a NaN made by its own code)
        self.parent_nonfinite: dict[str, bool] = {}
        self.alive: list[torch.Tensor] = []  # exact mode: every row's output, kept until the recorder goes
        self.stats = stats
        self.exact = exact
        self.unit_vectors = unit_vectors
        self._calls: dict[str, int] = {}
        self._feature_dim = -1  # units along the last dim after Linear, dim 1 after a convolution
        self.track_inputs = track_inputs
        self.rows: list[Row] = []
        # what rows wrote, by address, while the tensor lives (a freed output's address is reused): an
        # input at none of them was made by the model's own code (input_absmax: the monitor's headroom
        # alerts and check(dtype=) read it; a weak reference and a dict entry a row, ~0.4 us)
        self._dsts: dict[int, weakref.ref[torch.Tensor]] | None = {} if (safe or precision) and not exact else None
        self.stack: list[str] = []  # names of modules currently inside forward (functional capture only)
        self.leaf_depth = 0
        self._lifted: list[nn.Module] = []  # leaves running with the recording mode taken off (_Leaf.lifted)
        self._task, self._task_skips = -1, False  # the backward seen last, and whether its module calls are skipped
        self._handles: list[Any] = []
        # one traversal, shared below; a compiled submodule's inside is not hooked (see compiled())
        self._modules = outside_compiled(list(model.named_modules()) if named is None else named)
        self._names = {m: n for n, m in self._modules}
        self._leaves = leaf_modules(model, self._modules)
        self._callers = functional_callers(model, self._leaves, self._modules) if capture_functional else set()
        self.capture_functional = bool(self._callers)
        self._caller_names = {self._names.get(m) for m in self._callers}
        self._scope: _ScopedCapture | None = None
        self._info: dict[nn.Module, _Leaf] = {}
        self._scratch = S.Scratch()
        self.precision = precision
        opts = frozenset({"precision"}) if precision else frozenset()
        # the statistics with kernels this pass measures (lists the batches share: see set_headroom)
        self._opts = opts
        self._fk: list[Statistic] = []
        self._bk: list[Statistic] = []
        self.set_headroom(headroom)
        # the first low-precision format a row's output was in (FORMATS' name): a forward that enters
        # autocast inside itself computes in it although nothing said so when the pass began
        self.low_format: str | None = None
        self._weighed: set[int] = set()  # modules whose weights' formats were counted (precision)
        self._batches = S.Batches(unit_vectors, self._fk) if stats and not exact else None
        self._grad_batches = S.GradBatches(self._batches.done, self._bk) if self._batches is not None else None
        self._roles: dict[tuple[str, str, tuple[int, ...]], str] = {}
        self._positional = positional_containers(self._modules)
        self._capture_left = capture_budget if self._grad_batches is not None else 0
        self.edges: list[GradientEdge] = []  # see captured()
        self._edge_rows: list[Row] = []
        self._edge_tensors: list[torch.Tensor] = []  # the edges' tensors, until the backward (see settle_edges)
        self._fused_names: set[str] = set()  # MultiheadAttention modules: they measure their own attention
        self.busy = False  # computing a statistic with torch functions inside the forward (not recorded)
        # the last row's output, kept alive until the next row is recorded: freed, its address could be handed
        # to a tensor the model's own code makes in between (h = fc(x); h = h - 0.5; h = h * 4: the product took
        # the freed output's address), and the next row looked like it read the previous one's output directly
        # -- the theory column then predicted through two operations it never saw (3.6x off).  One output at a
        # time, let go when the forward returns (see forward_done).  Not in a monitor's recorder (safe): its
        # samples have no theory column, and the loop's backward, which it does not bracket, would keep it
        self._held: torch.Tensor | None = None
        # whether the forward being recorded is still running (the monitor's, which a KeyboardInterrupt can leave
        # without a hook); None: always (check runs the forward itself)
        self.running: Callable[[], bool] | None = None

    def set_headroom(self, on: bool) -> None:
        """Measure the largest |value| statistics (``headroom``, see
        ``__init__``) on the rows still to come, or not: the kernel lists
        the batches share are changed in place."""
        self.headroom = on
        self._fk[:] = [s for s in kernels("forward", self._opts) if on or s.name not in HEADROOM]
        self._bk[:] = [s for s in kernels("backward", self._opts) if on or s.name not in HEADROOM]

    def _low_precision(self, t: torch.Tensor) -> None:
        """``t`` is in a low-precision format: remember which, and measure the
        headroom statistics from this row on if the pass had left them out."""
        if self.low_format is None:
            self.low_format = formats.name_of(t.dtype)
        if not self.headroom:
            self.set_headroom(True)

    def _leaf_info(self, m: nn.Module) -> _Leaf:
        act = _act.from_module(m)
        has_params = any(p is not None for p in m._parameters.values())
        name, kind = self._names.get(m, "?"), type(m._orig_mod if compiled(m) else m).__name__
        return _Leaf(name, kind, act, *_traits(act),
                     feature_dim(m),
                     role_of(name, kind, m, (), self._positional) if has_params else None,
                     compiled(m) or (type(m).__module__.startswith("torch.nn.modules.")
                                     and not isinstance(m, _WEIGHING) and not _own_hooks(m)))

    # -- hooks ----------------------------------------------------------------
    def _pre(self, m: nn.Module, args: Any) -> None:
        if self.recomputing():
            return
        self.stack.append(self._names.get(m, "?"))
        info = self._info.get(m)
        if info is not None:
            self.leaf_depth += 1
            # compiled code runs without the recording mode (as it was compiled); torch's own leaves
            # (a Linear inside an attention module) make no call the mode records, and each of their ops
            # would pass through it
            # a MultiheadAttention given a nested tensor (a frozen nn.TransformerEncoder in eval mode packs a
            # padded batch so) must take torch's fused fast path, which refuses while a mode is on: off for it
            if (info.lifted or (isinstance(m, nn.MultiheadAttention) and _nested_arg(args))) \
                    and self._scope is not None and self._scope.lift():
                self._lifted.append(m)
        elif self._scope is not None and m in self._callers:
            self._scope.push()

    def _post(self, m: nn.Module, args: Any, out: Any) -> Any:
        if self.recomputing():
            return None
        lifted = bool(self._lifted) and self._lifted[-1] is m  # a leaf that ran with the mode off (see _pre)
        if lifted:
            self._lifted.pop()
        if self.stack:  # empty when attached inside a forward already running (the monitor's re-arm)
            self.stack.pop()
        if self._scope is not None and m in self._callers:
            self._scope.pop()
        info = self._info.get(m)
        if info is None:
            return None
        self.leaf_depth -= 1
        scope = self._scope
        if lifted or (scope is not None and scope.lift()):  # measured with the mode off, then put back
            try:
                return self._leaf_post(m, args, out, info)
            finally:
                cast(_ScopedCapture, scope).restore()
        return self._leaf_post(m, args, out, info)

    def recomputing(self) -> bool:
        """Whether this module call runs during a backward that follows the
        recorded forward: activation checkpointing recomputing it (its rows
        get their gradients through the recorded ones).  Decided once per
        backward, by whether rows were recorded before it began: the
        recomputation of a forward that ran without autograd (reentrant
        checkpointing of the whole model) is the pass there is to record."""
        task = torch._C._current_graph_task_id()
        if task == -1:
            return False
        if task != self._task:
            self._task, self._task_skips = task, bool(self.rows)
        return self._task_skips

    def entered(self, m: nn.Module, args: Any) -> None:
        """``m``'s forward had started when the recorder was attached (the
        monitor re-arming inside the root's pre-hook, after a forward that fed
        no backward): taken as entered, as its pre-hook would have, so that
        its functional calls are recorded and its return pops it."""
        if self.capture_functional and m in self._names:
            self._pre(m, args)

    # global hooks: every module of the process calls them, this model's only are recorded
    def _pre_any(self, m: nn.Module, args: Any) -> None:
        if m in self._names:
            self._pre(m, args)

    def _post_any(self, m: nn.Module, args: Any, out: Any) -> Any:
        return self._post(m, args, out) if m in self._names else None

    def _leaf_post_any(self, m: nn.Module, args: Any, out: Any) -> Any:
        info = self._info.get(m)
        if info is None or self.recomputing():
            return None
        return self._leaf_post(m, args, out, info)

    def _leaf_post(self, m: nn.Module, args: Any, out: Any, info: _Leaf | None = None) -> Any:
        """One leaf call: its row and its statistics (the whole per-row cost
        when no functional capture runs: one hook call per leaf call)."""
        if info is None:
            info = self._info[m]
        replaced = None
        aliased = False
        if self.stats and isinstance(out, torch.Tensor) and out.requires_grad and out._is_view() \
                and not (aliased := _aliases(out, args)):
            # An in-place op on a view (ReLU(inplace=True) after a Linear on
            # 3-D input) rebases the view's history, and a gradient hook on
            # it would never fire; a non-view copy of the output keeps it.
            # Not where the output is a view of the call's input (nn.Flatten,
            # nn.Identity on a transposed tensor): the caller holds that
            # input, which an in-place op on the output changes too -- on a
            # copy it would not, and the training would not be the same.
            out = replaced = out.clone()
        if info.feature_dim is not None:
            self._feature_dim = info.feature_dim
        t = out if isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()) \
            else first_float_tensor(out)
        if t is not None and transformed(t):
            self.transformed += 1
            return replaced
        if t is not None and not t.is_nested:  # (a nested output: torch's fused path for a packed batch)
            row = self._row(info.name, info.kind, m, info.act, t, info.role)
            row.aliased = aliased
            self._read(row, t, args)
            if not self.safe:
                self._held = t  # (see __init__)
            if self.stats:
                if self._dsts is not None:
                    self._input_written(row, t, args)
                self._measure(row, t, info.band, info.rectifier, info.nonnegative, args)
                if self.precision and info.role is not None and id(m) not in self._weighed:
                    self._weighed.add(id(m))
                    _weights_into(row.fwd, m)
                if isinstance(m, nn.RNNBase):
                    self._through_time(row, m, args)
            if self.track_inputs and info.feature_dim is not None:
                x = first_float_tensor(args)
                if x is not None:
                    with torch.no_grad():
                        row.input_second_moment = float(x.detach().float().pow(2).mean())
        return replaced

    def _read(self, row: Row, t: torch.Tensor, args: Any) -> None:
        """Where the row read from and wrote to (``src``, ``dst``), and the
        output's version.  A row that reads the previous row's output after an
        in-place write no row recorded (``h.mul_(4)``, a residual ``h += x``
        between two modules: same address, new values) reads something no row
        wrote, and gets ``src`` -1: the theory column stops there and the
        merge counts as a residual one.  A module that writes its own input
        in place (``ReLU(inplace=True)``) may bump it once."""
        row.dst = _ptr(t)
        row.ver = _version(t)
        a = _first_floating(args)
        if a is None:
            return
        row.src = _ptr(a)
        row.in_shape = a.shape
        if row.src and len(self.rows) > 1:
            prev = self.rows[-2]
            if row.src == prev.dst and prev.ver >= 0 and _version(a) - prev.ver > (1 if row.dst == row.src else 0):
                row.src = -1

    def _input_written(self, row: Row, t: torch.Tensor, args: Any) -> None:
        """``input_absmax`` of a row whose input no earlier row wrote (see
        :func:`_input_extremes_into`); then this row's output is one."""
        assert self._dsts is not None
        if row.src and len(self.rows) > 1 and row.src != self.rows[-2].dst:
            w = self._dsts.get(row.src)
            if w is None or w() is None:
                _input_extremes_into(row.fwd, args)
        if row.dst:
            self._dsts[row.dst] = weakref.ref(t)

    def _through_time(self, row: Row, m: nn.RNNBase, args: Any) -> None:
        """A recurrent module's gradient per time step at its input sequence
        (see :func:`_time_hook`), read by a hook on that input."""
        x = args[0] if isinstance(args, (tuple, list)) and args else None
        if isinstance(x, PackedSequence):
            data = x.data
            if not data.requires_grad or data.dim() < 1 or data.shape[0] == 0:
                return
            sizes = x.batch_sizes.to(data.device)
            packed = (torch.repeat_interleave(torch.arange(len(sizes), device=data.device), sizes), sizes)
            data.register_hook(functools.partial(_safe_time_hook, self.errors, row, 0, self.exact, packed=packed)
                               if self.safe else functools.partial(_time_hook, row, 0, self.exact, packed=packed))
            return
        if not isinstance(x, torch.Tensor) or not x.requires_grad or x.dim() < 2:
            return  # an input no gradient reaches
        tdim = 1 if m.batch_first and x.dim() == 3 else 0
        x.register_hook(functools.partial(_safe_time_hook, self.errors, row, tdim, self.exact) if self.safe
                        else functools.partial(_time_hook, row, tdim, self.exact))

    def record(self, name: str, kind: str, module: nn.Module | None, act: _act.Activation | None,
               t: torch.Tensor, args: Any = ()) -> Row:
        """A row for one call (a functional activation's, say), measured."""
        row = self._row(name, kind, module, act, t, None)
        self._read(row, t, args)
        if not self.safe:
            self._held = t  # (see __init__)
        if self.stats:
            if self._dsts is not None and row.dst:
                self._dsts[row.dst] = weakref.ref(t)
            self._measure(row, t, *_traits(act), args)
        return row

    def _row(self, name: str, kind: str, module: nn.Module | None, act: _act.Activation | None,
             t: torch.Tensor, role: str | None) -> Row:
        shape = tuple(t.shape)
        if role is None:
            key = (name, kind, shape)
            role = self._roles.get(key)
            if role is None:
                role = self._roles[key] = role_of(name, kind, module, shape, self._positional)
        # a module called at several places of a block (one dropout after attention and after
        # the MLP) has one role per call site: its k-th call in this pass
        k = self._calls.get(name, 0)
        self._calls[name] = k + 1
        row = Row(len(self.rows), name, kind, name.count(".") + 1 if name else 0, shape, module, act,
                  f"{role}@{k}" if k else role)
        self.rows.append(row)
        return row

    def _measure(self, row: Row, t: torch.Tensor, band: tuple[float, float] | None, rectifier: bool,
                 nonnegative: bool, args: Any) -> None:
        # no graph is recorded for the statistics, so no detach() copy of the handle is needed
        # (grad mode switched directly: torch.no_grad() costs more than the reductions on small rows)
        if t.dtype in _LOW_DTYPES:
            row.low = True
            self._low_precision(t)
        batches = self._batches
        small = batches is not None and S.Batches.fits(t)  # copied now, measured with others
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if batches is not None and small:
                batches.add(row.fwd, t, band, rectifier, nonnegative, self._feature_dim)
            else:
                flat = None
                if self.exact:
                    row.fwd.update(S.exact_moments(t, "forward", band is not None, self._fk))
                else:
                    flat = S.forward_moments_into(row.fwd, t, self._scratch, band is not None, self._fk)
                if band is not None:
                    S.saturation_into(row.fwd, t, band, self._scratch, flat)
                if rectifier:
                    dead = S.dead_units(t, self._feature_dim, self.unit_vectors, nonnegative)
                    if dead is not None:
                        row.fwd.update(dead)
        finally:
            torch._C._set_grad_enabled(prev)
        if self.exact:
            row.output = weakref.ref(t)
            row.inputs = [weakref.ref(a) for a in _tensors(args)]
            with torch.no_grad():  # whether the row read finite values (its input may be freed before it is asked)
                row.inputs_finite = [torch.isfinite(a).all() for a in _tensors(args)]
            # held for the pass: a freed output's address, reused by a later tensor, would make the next
            # row look like it reads this one (src == dst) and hide an operation between them
            self.alive.append(t)
        if t.requires_grad:
            # the hook holds the row only, not the recorder (nor through it the model): a step's
            # graph kept alive by its loss tensor does not keep the model alive with it
            fn = t.grad_fn
            row.wants_grad = True
            how = self.exact or self._grad_batches or False  # the hook holds the batches, not the recorder
            if fn is not None and self._capture_left > 0 and small:  # (a budget only where there are batches)
                # the caller's autograd.grad returns this gradient with the parameters' (no Python runs
                # per row in the backward); the edge is the node that made t, as for the pre-hook below
                self._capture_left -= t.numel() * t.element_size()
                self.edges.append(GradientEdge(fn, t.output_nr))
                self._edge_rows.append(row)
                self._edge_tensors.append(t)
            elif fn is not None:  # a pre-hook of the node that made t: see _grad_prehook
                if self.safe:
                    hook = functools.partial(_safe_grad_prehook, self.errors, row, how, t.output_nr, kernels=self._bk)
                elif type(how) is S.GradBatches:
                    hook = functools.partial(_batched_prehook, how, row, t.output_nr)
                else:
                    hook = functools.partial(_grad_prehook, row, how, t.output_nr, kernels=self._bk)
                fn.register_prehook(hook)
            else:  # a leaf that requires grad (a module that returns its input or a parameter)
                t.register_hook(functools.partial(_safe_grad_hook, self.errors, row, how, kernels=self._bk)
                                if self.safe else functools.partial(_grad_hook, row, how, kernels=self._bk))

    # -- lifecycle --------------------------------------------------------------
    def attach(self) -> None:
        """Hook the model: with functional capture, every module (the stack of
        modules in forward names each functional call's parent); without it,
        the leaf modules only.  The hooks are torch's global module hooks,
        registered once and ignoring modules that are not this model's,
        rather than a pair per module (a handle per module measured ~4 us,
        16 ms on a 2,000-layer MLP).  Global hooks run before a module's
        own forward hooks, so when a leaf has hooks of its own (which may
        replace its output) every module is hooked on its own instead, after
        them, to see the output that flows on; and when the model holds a
        ``torch.compile``'d submodule, which torch warns about under global
        hooks (they fire for its wrapper too)."""
        self._info = {m: self._leaf_info(m) for m in self._leaves}
        g = self._guarded if self.safe else (lambda f: f)
        fused = [m for m in self._leaves if isinstance(m, nn.MultiheadAttention)] if self.stats else []
        self._fused_names = {self._names[m] for m in fused}
        if self.exact:  # the slow pass after a NaN: every enclosing module's output checked too
            self._handles.append(register_weakly(register_module_forward_hook, self._parent_post, g))
        per_module = any(m._forward_hooks for m in self._leaves) or \
            any(type(m).__name__ == "OptimizedModule" for _, m in self._modules)
        if self.capture_functional:
            if per_module:
                for _, m in self._modules:
                    self._handles.append(m.register_forward_pre_hook(Hook(g(self._pre))))
                    self._handles.append(m.register_forward_hook(Hook(g(self._post))))
            else:
                self._handles += [register_weakly(register_module_forward_pre_hook, self._pre_any, g),
                                  register_weakly(register_module_forward_hook, self._post_any, g)]
        elif per_module:
            for m in self._leaves:
                self._handles.append(m.register_forward_hook(Hook(g(self._leaf_post_any))))
        else:
            self._handles.append(register_weakly(register_module_forward_hook, self._leaf_post_any, g))
        for m in fused:  # after the hooks above: the module's row exists when these run
            self._handles.append(m.register_forward_hook(Hook(g(self._fused_attention)), with_kwargs=True))

    def forward_done(self) -> None:
        """The forward has returned: the last row's output is no longer held
        (see ``_held``), so the backward does not keep it alive."""
        self._held = None

    def _fused_attention(self, m: nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        """``nn.MultiheadAttention``'s logits and entropies, into its row
        (see :func:`.attention.from_mha`)."""
        row = next((r for r in reversed(self.rows) if r.module is m), None)
        if row is None:
            return
        self.busy = True
        try:
            with torch.no_grad():
                stats = attention.from_mha(m, tuple(args), kwargs)
        finally:
            self.busy = False
        if stats is not None:
            row.fwd.update(stats)

    def _parent_post(self, m: nn.Module, args: Any, out: Any) -> None:
        name = self._names.get(m)
        if name is None or m in self._info:
            return
        t = first_float_tensor(out)
        if t is not None:
            with torch.no_grad():
                self.parent_nonfinite[name] = not bool(torch.isfinite(t).all())

    def _guarded(self, hook: Any) -> Any:
        """``hook`` with its failures kept in ``errors`` (see ``safe``)."""
        errors = self.errors

        def guarded(*args: Any) -> Any:
            if in_own_pass():  # a monitor's recorder: signalprop's own pass through the model (sp.check) is not its
                return None
            try:
                return hook(*args)
            except Exception as e:  # a guest in the user's forward never raises into it
                errors.append(e)
                return None

        return guarded

    def detach(self) -> None:
        """Remove the forward hooks (the gradient hooks on outputs already
        produced stay, to measure their gradients) and measure the outputs still waiting in a
        batch: every row's forward statistics are set from here on."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._held = None
        if self._batches is not None:
            with torch.no_grad():
                self._batches.flush()

    def release(self) -> None:
        """Drop what the rows hold of the model once the pass has been read: a
        gradient hook left on a graph the caller keeps (the last loss tensor)
        then holds a row's numbers only, not its module or the tensors it
        saw."""
        for r in self.rows:
            r.module = None
            r.output = None
            r.inputs = []
            r.inputs_finite = []
        self.alive.clear()

    def settle_edges(self) -> None:
        """Before the backward: the rows whose output got a tensor hook of
        the user's after the row was recorded (``h.register_hook(lambda g:
        g * 1e-9)`` in the forward) take their gradient through a pre-hook
        of the node that made it, which sees the hooked gradient, as
        training's does -- a captured edge reads it before the hook (the
        layer was "healthy" at 1e9 times its true gradient)."""
        how = self.exact or self._grad_batches or False
        keep: list[tuple[GradientEdge, Row]] = []
        for edge, row, t in zip(self.edges, self._edge_rows, self._edge_tensors):
            # (an in-place op after the hook -- ReLU(inplace=True) -- clears t's hooks, not the node's: a
            # write since the row was recorded counts as a hook)
            if t._backward_hooks or _version(t) != row.ver:
                edge.node.register_prehook(functools.partial(_grad_prehook, row, how, edge.output_nr,
                                                             kernels=self._bk))
            else:
                keep.append((edge, row))
        self.edges, self._edge_rows = [e for e, _ in keep], [r for _, r in keep]
        self._edge_tensors = []

    def captured(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Take the gradients of :attr:`edges`, in order, as the backward
        returned them (None where none reached the row), into the gradient
        batches.  A backward that captures them runs no Python per row: on a
        2,000 x 64 MLP the hooks were a third of check's own cost."""
        assert self._grad_batches is not None or not self.edges
        if self._grad_batches is not None:
            with torch.no_grad():
                self._grad_batches.add_many([r.bwd for r in self._edge_rows], grads)
        self.edges, self._edge_rows = [], []

    def batched(self) -> list[S.Batched]:
        """The forward and gradient statistics measured several rows at a
        time (see :class:`~.stats.Batches`, :class:`~.stats.GradBatches`),
        still on their devices: complete once :meth:`detach` and the
        backward have run (the last gradients are measured here)."""
        if self._grad_batches is not None:  # the gradients the backward copied, measured now
            with torch.no_grad():
                self._grad_batches.flush()
        # a pass only create_graph backwards reached (the loss's own backward(create_graph=True), for a
        # Hessian-vector product): their gradients are the pass's; where the loss's backward came after a
        # derivative's (a PINN's du/dt), a row it did not reach has none; where the loss's own
        # backward(create_graph=True) came first (its gradients in .grad with a graph) and a backward through
        # those gradients followed (the Hessian-vector product's, which fills no .grad), the loss's are the pass's
        if any(r.after_graph == 2 for r in self.rows):
            for r in self.rows:
                r.bwd = r.bwd_graph
        elif not any(r.bwd for r in self.rows):
            for r in self.rows:
                if r.bwd_graph:
                    r.bwd = r.bwd_graph
        return self._batches.done if self._batches is not None else []

    def functional_mode(self) -> _ScopedCapture | None:
        """The context in which functional activation calls are recorded, or
        None when the model cannot make any (see :func:`functional_callers`)."""
        return _ScopedCapture(self) if self.capture_functional else None

    def failed_in(self, exc: BaseException) -> str | None:
        """Name of the innermost module of the model whose forward was running
        when ``exc`` was raised: the module stack when every module is hooked,
        else the innermost frame of the traceback that is a module's method."""
        if self.stack:
            return self.stack[-1]
        where = None
        tb = exc.__traceback__
        while tb is not None:
            obj = tb.tb_frame.f_locals.get("self")
            if isinstance(obj, nn.Module) and obj in self._names:
                where = self._names[obj]
            tb = tb.tb_next
        return where
