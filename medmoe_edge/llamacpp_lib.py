"""The patched llama-cpp-python, as both the GGUF exporter (`llama_model_quantize`) and the llamacpp
runtime load it: import, the check that the loaded libllama knows the Med-MoE architectures, and
the one-time backend initialisation.

Core module: export/ and runtimes/ must not import each other, so what both need lives here.
llama_cpp is imported lazily, inside the functions.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os

from .errors import RuntimeUnavailable

ARCH_NAMES = ("medmoe-phi2", "medmoe-stablelm")  # added by patches/llamacpp-0.3.36-medmoe.patch
# mmproj keys the patch teaches mtmd; a build from an older patch ignores them silently (and would
# compute the projector with tanh GELU), so their presence in libmtmd is checked too.
MTMD_KEYS = ("clip.vision.projector.use_gelu_erf",)
# What is searched for in libmtmd: the key names themselves are built into std::strings by the
# compiler (no literal left in the library), so the log line the patch prints when the key is set
# stands for it.
_MTMD_MARKERS = {"clip.vision.projector.use_gelu_erf": "%s: projector act:      gelu_erf\n"}
BUILD_COMMAND = "bash scripts/build_llamacpp.sh"


def import_llama():
    """(llama_cpp, llama_cpp.llama_cpp, llama_cpp.mtmd_cpp), or RuntimeUnavailable saying how to get them."""
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as lib
        import llama_cpp.mtmd_cpp as mtmd
    except Exception as e:  # ImportError, or OSError/RuntimeError when a shared library fails to load
        raise RuntimeUnavailable(f"llama.cpp needs llama-cpp-python with the Med-MoE patch ({type(e).__name__}: {e}); build it with `{BUILD_COMMAND}`") from None
    return llama_cpp, lib, mtmd


@functools.lru_cache(maxsize=None)
def _library_knows(path: str, needle: bytes) -> bool:
    """Whether the shared library at `path` contains the NUL-terminated string `needle` (cheap: mmap + find)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(needle + b"\0") >= 0


def library_has_archs(path: str) -> tuple[bool, list[str]]:
    """(all medmoe archs present?, the missing ones) for the llama.cpp shared library at `path`.

    llama.cpp has no API that lists architecture names, so the name table compiled into the
    library (`LLM_ARCH_NAMES`) is searched for them.
    """
    missing = [a for a in ARCH_NAMES if not _library_knows(path, a.encode())]
    return not missing, missing


def loaded_library_path() -> str | None:
    """The path of the libllama that llama_cpp has loaded, when it can be told."""
    _llama_cpp, lib, _mtmd = import_llama()
    path = getattr(getattr(lib, "_lib", None), "_name", None)
    return path if path and os.path.isfile(path) else None


def loaded_mtmd_path() -> str | None:
    """The path of the libmtmd that llama_cpp.mtmd_cpp has loaded, when it can be told."""
    _llama_cpp, _lib, mtmd = import_llama()
    path = getattr(getattr(mtmd, "_libmtmd", None), "_name", None)
    return path if path and os.path.isfile(path) else None


def mtmd_missing_keys(path: str) -> list[str]:
    """The `MTMD_KEYS` that the libmtmd at `path` does not know (searched like the arch names)."""
    return [k for k in MTMD_KEYS if not _library_knows(path, _MTMD_MARKERS[k].encode())]


def stale_mtmd_message(version: str, missing: list[str]) -> str:
    """The one-line error for a patched build whose mtmd predates the projector keys."""
    return f"llama-cpp-python {version} was built from an older Med-MoE patch: its mtmd ignores {', '.join(missing)} (the projector's exact GELU); rebuild it with `{BUILD_COMMAND}`"


def unpatched_message(version: str) -> str:
    """The one-line error for a llama-cpp-python without the Med-MoE patch."""
    return f"llama-cpp-python {version} lacks the Med-MoE architectures ({', '.join(ARCH_NAMES)}): build the patched one with `{BUILD_COMMAND}`"


def _patched(llama_cpp, lib) -> tuple[bool, str]:
    """(whether the loaded libllama has the medmoe archs, llama-cpp-python's version).

    When the library path is unknown, the version suffix that `scripts/build_llamacpp.sh` gives
    the patched build ("+medmoe") decides.
    """
    version = str(getattr(llama_cpp, "__version__", "?"))
    path = loaded_library_path()
    if path:
        try:
            return library_has_archs(path)[0], version
        except OSError:
            pass
    return "+medmoe" in version, version


def require_patched_llama_cpp():
    """The low-level `llama_cpp.llama_cpp` bindings of a Med-MoE-patched build (e.g. for `llama_model_quantize`),
    with the backend initialised and llama.cpp's logs reduced to errors.

    Raises:
        RuntimeUnavailable: llama-cpp-python is missing, fails to load, or lacks the medmoe archs.
    """
    llama_cpp, lib, mtmd = import_llama()
    ok, version = _patched(llama_cpp, lib)
    if not ok:
        raise RuntimeUnavailable(unpatched_message(version))
    mtmd_path = loaded_mtmd_path()
    missing = mtmd_missing_keys(mtmd_path) if mtmd_path else []
    if missing:
        raise RuntimeUnavailable(stale_mtmd_message(version, missing))
    init_backend(lib, mtmd)  # before any llama.cpp call, so that its logs go through the quiet logger
    return lib


_backend_ready = False


def init_backend(lib, mtmd) -> None:
    """llama_backend_init once per process; route llama.cpp and mtmd logs through llama-cpp-python's logger.

    That logger prints only errors unless the application configured it (as `Llama(verbose=False)`).
    """
    global _backend_ready
    if _backend_ready:
        return
    import llama_cpp._logger as lg

    if lg.logger.level == logging.NOTSET:
        lg.set_verbose(False)
    for setter in ("mtmd_log_set", "mtmd_helper_log_set"):
        if hasattr(mtmd, setter):
            getattr(mtmd, setter)(lg.llama_log_callback, ctypes.c_void_p(0))
    lib.llama_backend_init()
    _backend_ready = True


__all__ = ["ARCH_NAMES", "BUILD_COMMAND", "MTMD_KEYS", "import_llama", "init_backend", "library_has_archs", "loaded_library_path", "loaded_mtmd_path", "mtmd_missing_keys", "require_patched_llama_cpp", "stale_mtmd_message", "unpatched_message"]


def model_meta(lib, model, key: str) -> str | None:
    """A metadata value of a loaded llama.cpp model as text (None when the key is absent)."""
    import ctypes

    buf = ctypes.create_string_buffer(256)
    n = lib.llama_model_meta_val_str(model, key.encode(), buf, ctypes.sizeof(buf))
    return buf.value.decode() if n >= 0 else None


def file_type_precision(code: int):
    """The `Precision` of a llama.cpp file type (`general.file_type`), None for one we do not export."""
    import llama_cpp

    from .vocab import Precision

    for p in Precision:
        name = "LLAMA_FTYPE_ALL_F32" if p is Precision.FP32 else f"LLAMA_FTYPE_MOSTLY_{'F16' if p is Precision.FP16 else p.value.upper()}"
        if getattr(llama_cpp, name, None) == code:
            return p
    return None
