export PYTHONPATH=src PYTHONUNBUFFERED=1 MPLBACKEND=agg
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_init_exact.py -k cuda 2>&1 | tail -3
timeout 120 python3 benchmarks/device_check.py $OUT 2>&1 | tail -40
timeout 330 python3 -m signalprop.cli lab run depth --out $OUT/d10k --set 'depths=[10000]' --set 'acts=["tanh","sigmoid"]' --set 'inits=["critical"]' --set steps=300 --set 'lr_scale=[0.3]' --set residual_blocks=0 --set device='"cuda"' 2>&1 | tail -8
ls -R $OUT | head
