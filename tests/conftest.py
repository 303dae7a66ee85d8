import atexit
import os
import shutil
import tempfile

# The suite writes caches (cpu plans, embedding stores, bench models, Triton kernels): never into the
# user's own ~/.cache/fastenc or ~/.triton. Unless the runner chose them, they go to one temporary
# folder per session, removed at the end. (Set before torch, triton or fastenc read them.)
SESSION_CACHE_ROOT = tempfile.mkdtemp(prefix="fastenc-tests-")
atexit.register(shutil.rmtree, SESSION_CACHE_ROOT, ignore_errors=True)
SESSION_CACHES = {"FASTENC_CACHE_DIR": "fastenc", "TRITON_CACHE_DIR": "triton/cache", "TRITON_HOME": "triton-home"}
PRESET = {name for name in SESSION_CACHES if os.environ.get(name)}  # the runner's choice is kept
for _name, _sub in SESSION_CACHES.items():
    if _name not in PRESET:
        os.environ[_name] = os.path.join(SESSION_CACHE_ROOT, _sub)

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: FASTENC_TEST_CPU_CLASS=avx2 runs the suite as on a CPU without native bf16 (fastenc's own CPU checks
#: see no AMX / AVX512-BF16 flags), so the AVX2 default (the fp32 plan) is tested on any x86 machine.
if os.environ.get("FASTENC_TEST_CPU_CLASS") == "avx2":
    import fastenc.info as _info

    _real_flags = _info.cpu_flags
    _info.cpu_flags = lambda: _real_flags() - {"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16"}
#: The planner's ONNX Runtime candidates (CPUs without native bf16) cost a ~5 s ONNX export per search: the
#: suite offers them only in the tests about them (which clear this), unless the runner chose the engines.
os.environ.setdefault("FASTENC_CPU_ENGINES", "eager,openvino")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none on this machine"))
