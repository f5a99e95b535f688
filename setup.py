"""Build fused_resnet._C: C++ CPU kernels always, CUDA kernels when they can be built.

Environment switches (all optional):

* ``FUSED_RESNET_SKIP_CUDA_BUILD=1`` -- build the CPU kernels only (fast iteration).
* ``FUSED_RESNET_CUDA_ARCHS="80;90"`` -- compute capabilities to compile for (default
  ``80;90``: A100 and H100/H200). Separators ``;``, ``,`` or space; ``8.0`` and ``80``
  both work; a trailing ``a`` (``90a``) selects the architecture-specific target.
* ``FUSED_RESNET_FORCE_CUDA_BUILD=1`` -- fail instead of falling back to a CPU-only build
  when the CUDA part cannot be built.
* ``CUDA_HOME`` / ``CUDA_PATH`` -- the CUDA toolkit. Without them the toolkit is found from
  ``nvcc`` on PATH, following symlinks and wrapper scripts that ``exec`` the real ``nvcc``,
  then ``/usr/local/cuda``.
* ``MAX_JOBS`` -- parallel compile jobs (ninja), as in every PyTorch extension.

The CUDA part is built when a CUDA toolkit is found *and* the installed torch is a CUDA
build whose major CUDA version matches the toolkit's. The build prints what it built.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[fused_resnet build] {msg}", file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def _nvcc_behind(path: str, depth: int = 0) -> str | None:
    """Real nvcc behind ``path``: follows symlinks and small shell wrappers."""
    real = os.path.realpath(path)
    if depth > 4 or not os.path.isfile(real):
        return None
    with open(real, "rb") as f:
        head = f.read(4096)
    if not head.startswith(b"#!"):
        return real  # a binary: the real compiler
    for candidate in re.findall(rb"(/[^\s\"'`;|&]*?/bin/nvcc)\b", head):
        cand = candidate.decode()
        if os.path.realpath(cand) != real and os.path.exists(cand):
            found = _nvcc_behind(cand, depth + 1)
            if found:
                return found
    return None


def find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = _nvcc_behind(nvcc)
        if real:
            home = os.path.dirname(os.path.dirname(real))
            if _is_toolkit(home):
                return home
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _is_toolkit(home):
            return home
    return None


def parse_archs(spec: str) -> list[str]:
    """'80;90a' / '8.0, 9.0' -> ['8.0', '9.0a'] (TORCH_CUDA_ARCH_LIST spelling)."""
    archs = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        m = re.fullmatch(r"(\d+)\.?(\d)([af]?)(\+PTX)?", tok)
        if not m:
            raise SystemExit(f"FUSED_RESNET_CUDA_ARCHS: cannot read {tok!r}; expected e.g. '80;90'")
        archs.append(f"{m.group(1)}.{m.group(2)}{m.group(3)}{m.group(4) or ''}")
    if not archs:
        raise SystemExit("FUSED_RESNET_CUDA_ARCHS: no architecture given")
    return archs


def _toolkit_version(home: str) -> str | None:
    path = os.path.join(home, "version.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("cuda", {}).get("version")
    header = os.path.join(home, "include", "cuda.h")
    if os.path.isfile(header):
        with open(header) as f:
            m = re.search(r"#define CUDA_VERSION (\d+)", f.read())
        if m:
            v = int(m.group(1))
            return f"{v // 1000}.{(v % 1000) // 10}"
    return None


def plan_cuda(torch) -> tuple[str | None, list[str], str]:
    """(cuda_home, archs, reason) -- cuda_home None means CPU-only, reason says why."""
    if _env_flag("FUSED_RESNET_SKIP_CUDA_BUILD"):
        return None, [], "FUSED_RESNET_SKIP_CUDA_BUILD is set"
    if not torch.version.cuda:
        return None, [], f"torch {torch.__version__} is not a CUDA build"
    home = find_cuda_home()
    if home is None:
        return None, [], "no CUDA toolkit found (set CUDA_HOME)"
    tk = _toolkit_version(home)
    if tk and tk.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, [], (
            f"CUDA toolkit {tk} at {home} does not match torch's CUDA {torch.version.cuda}"
        )
    archs = parse_archs(os.environ.get("FUSED_RESNET_CUDA_ARCHS", "80;90"))
    return home, archs, f"CUDA toolkit {tk or '?'} at {home}"


def openmp_flags(torch) -> list[str]:
    """``-fopenmp`` (compile and link) where torch's ATen parallel backend is OpenMP -- every Linux
    wheel. ``at::parallel_for`` is a header template: its threads exist only when the code that
    instantiates it is itself compiled with OpenMP, so without the flag every CPU kernel here runs
    on one thread whatever ``torch.get_num_threads()`` says. The extension then links
    ``libgomp.so.1``, which resolves to the copy torch already loaded (same soname): one OpenMP
    runtime and one thread pool in the process. Not on macOS/Windows (their torch builds and
    compilers differ; the kernels stay single-threaded there, and the build says so)."""
    parallel = torch.__config__.parallel_info()
    if "parallel backend: OpenMP" not in parallel:
        _log("torch's ATen parallel backend is not OpenMP: CPU kernels use ATen's own thread pool")
        return []
    if sys.platform == "darwin" or os.name == "nt":
        _log("OpenMP flags are not set on this platform: the CPU kernels run single-threaded")
        return []
    if not _compiles_openmp():
        _log("the C++ compiler cannot build OpenMP code (-fopenmp, <omp.h>): the CPU kernels run "
             "single-threaded; install the compiler's OpenMP runtime (e.g. libgomp / libomp) and rebuild")
        return []
    return ["-fopenmp"]


def _compiles_openmp() -> bool:
    """Whether ``$CXX`` (default ``c++``) compiles and links a program using <omp.h> with -fopenmp."""
    import subprocess
    import tempfile

    cxx = os.environ.get("CXX", "c++").split()
    src = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            r = subprocess.run([*cxx, "-fopenmp", "-x", "c++", "-", "-o", os.path.join(tmp, "omp_probe")],
                               input=src, text=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
    return r.returncode == 0


def build_extensions():
    # CUDA_HOME must be right before torch.utils.cpp_extension is imported: it reads the
    # variable once, at import, and would otherwise guess from the nvcc wrapper's folder.
    import torch

    cuda_home, archs, reason = plan_cuda(torch)
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    from torch.utils import cpp_extension

    if cuda_home and cpp_extension.CUDA_HOME != cuda_home:
        cpp_extension.CUDA_HOME = cuda_home

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    defines = [("FUSED_RESNET_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3"]
    omp = openmp_flags(torch)
    cxx += omp
    if cuda_home:
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        arch_str = ";".join(a.replace(".", "") for a in archs)
        defines += [("FUSED_RESNET_WITH_CUDA", None), ("FUSED_RESNET_CUDA_ARCHS", f'"{arch_str}"')]
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        if _env_flag("FUSED_RESNET_PTXAS_VERBOSE"):
            nvcc.append("-Xptxas=-v")
        ext = cpp_extension.CUDAExtension(
            "fused_resnet._C",
            sources,
            define_macros=defines,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=omp,
        )
        _log(f"building CPU + CUDA kernels for sm_{', sm_'.join(arch_str.split(';'))} ({reason})")
    else:
        if _env_flag("FUSED_RESNET_FORCE_CUDA_BUILD"):
            raise SystemExit(f"FUSED_RESNET_FORCE_CUDA_BUILD is set but CUDA cannot be built: {reason}")
        ext = cpp_extension.CppExtension(
            "fused_resnet._C",
            sources,
            define_macros=defines,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=omp,
        )
        _log(f"building CPU kernels only ({reason})")

    class BuildExt(cpp_extension.BuildExtension):
        """Records what was built next to the extension, for `fused-resnet info` and the
        import-time check that _C matches the installed torch."""

        def run(self):
            super().run()
            for e in self.extensions:
                out = os.path.join(os.path.dirname(self.get_ext_fullpath(e.name)), "_C_build.json")
                info = {
                    "torch_version": torch.__version__,
                    "torch_cuda": torch.version.cuda,
                    "cuda": bool(cuda_home),
                    "cuda_archs": [a.replace(".", "") for a in archs],
                    "cuda_home": cuda_home,
                    "reason": reason,
                    "openmp": bool(omp),
                }
                with open(out, "w") as f:
                    json.dump(info, f, indent=1)
            _log("built " + ("CPU + CUDA (sm_" + ", sm_".join(a.replace(".", "") for a in archs) + ")"
                             if cuda_home else "CPU only") + f" against torch {torch.__version__}")

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None
                                                      or _has_ninja_module())}


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


ext_modules, cmdclass = build_extensions()

setup(
    packages=find_packages(include=["fused_resnet", "fused_resnet.*"]),
    package_data={"fused_resnet": ["_C_build.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
