"""JIT build of shardwise's small C kernels (today: the CPU Adam step), cached by content hash.

Owns: finding a C compiler, compiling a kernel source into a shared library with the host's vector
instructions, caching the result, and loading it with ctypes. Nothing here knows what a kernel
computes; callers declare the signatures.

Why JIT and not a prebuilt extension: the kernel wants ``-march=native`` (AVX-512 on one host,
AVX2 or NEON on another), needs no torch headers (it works on raw data pointers), and compiles in
well under a second, so building it on first use keeps the package pure Python and installable
anywhere. A host without a compiler still works: :func:`load_kernel` returns ``None`` and callers
fall back to torch.

No OpenMP: kernels are built single-threaded and link nothing but libc/libm; callers that want
threads split the work themselves (see :mod:`shardwise.ops.adam.cpu_adam`). A process running torch
already has an OpenMP runtime and several thread pools, and a kernel must not add another.

Cache: ``$SHARDWISE_CACHE_DIR`` (default ``~/.cache/shardwise``) holds ``<name>-<hash>.so``, the hash
covering the source, the compiler's identity, the flags and the CPU's feature flags, so a source
edit, a compiler upgrade or a home directory shared by different CPUs each get their own build
(builds from older flag sets, such as the former ``-fopenmp`` ones, are never picked up again).
Several ranks may build at once: each compiles to its own temporary file and renames it into
place atomically, so a reader sees either no library or a complete one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
DEFAULT_FLAGS = (
    "-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared", "-std=gnu11",
)

# Libraries named after the source (the linker drops unused ones): libm for pow/sqrt, which the
# kernel must not pick up from whatever the host process happens to have loaded.
LINK_LIBS = ("-lm",)

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_errors: dict[str, str] = {}


class KernelBuildError(RuntimeError):
    """Compiling or loading a kernel failed; the message carries the compiler's output."""


def cache_dir() -> Path:
    """Directory for built kernels: ``$SHARDWISE_CACHE_DIR`` or ``~/.cache/shardwise``."""
    env = os.environ.get("SHARDWISE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shardwise"


def find_compiler() -> str | None:
    """The C compiler to use: ``$CC`` if set, else the first of gcc, cc, clang on PATH."""
    env = os.environ.get("CC")
    if env:
        return shutil.which(env) or None
    for name in ("gcc", "cc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_signature() -> str:
    """Identify the CPU's instruction set, because -march=native output is only valid on it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _compiler_identity(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else compiler
    except (OSError, subprocess.SubprocessError):
        return compiler


def _library_path(name: str, source: Path, compiler: str, flags: tuple[str, ...]) -> Path:
    digest = hashlib.sha256()
    for part in (source.read_bytes(), _compiler_identity(compiler).encode(), " ".join(flags + LINK_LIBS).encode(),
                 _cpu_signature().encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / f"{name}-{digest.hexdigest()[:16]}.so"


def _private_temp_dir() -> Path:
    """``<tmp>/shardwise-<uid>``, created 0700; refused if another user owns it or can write to it
    (a library loaded from there runs in our process)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = Path(tempfile.gettempdir()) / f"shardwise-{uid if uid is not None else 'user'}"
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.stat()
    if uid is not None and (st.st_uid != uid or st.st_mode & 0o022):
        raise KernelBuildError(f"{path} is owned by another user or writable by others; refusing to build there "
                               "(set SHARDWISE_CACHE_DIR to a private writable directory)")
    return path


def build(name: str, source: Path, flags: tuple[str, ...] = DEFAULT_FLAGS) -> Path:
    """Compile ``source`` into a cached shared library and return its path.

    Reuses a cached build when one exists. Raises :class:`KernelBuildError` with the compiler's
    output when no compiler is found or compilation fails.
    """
    compiler = find_compiler()
    if compiler is None:
        raise KernelBuildError(
            f"no C compiler found for the {name} kernel (looked for $CC, gcc, cc, clang); "
            "install gcc (e.g. `apt-get install gcc`) to enable it"
        )
    target = _library_path(name, source, compiler, flags)
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so.tmp", dir=target.parent)
    except OSError as exc:  # read-only home (some CI containers): build under the temp dir instead
        fallback = _private_temp_dir()
        logger.warning("cache dir %s is not writable (%s); building in %s", target.parent, exc, fallback)
        target = fallback / target.name
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, "-o", tmp, str(source), *LINK_LIBS]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise KernelBuildError(
                f"compiling the {name} kernel failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                f"{proc.stderr.strip()}"
            )
        os.replace(tmp, target)  # atomic: concurrent builders each publish a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built %s kernel: %s", name, target)
    return target


def load_kernel(name: str, source: Path | None = None) -> ctypes.CDLL | None:
    """Build (if needed) and load kernel ``name`` from ``csrc/<name>.c``; ``None`` if unavailable.

    The outcome is memoised per process. On failure the reason is logged once as a warning and
    kept in :func:`build_error`, and ``None`` is returned so callers can fall back to torch.
    """
    with _lock:
        if name in _loaded:
            return _loaded[name]
        src = source or CSRC_DIR / f"{name}.c"
        lib: ctypes.CDLL | None = None
        failures = []
        for flags in _flag_variants():
            try:
                lib = ctypes.CDLL(str(build(name, src, flags)))
                break
            except (KernelBuildError, OSError, subprocess.SubprocessError) as exc:
                failures.append(str(exc))
                if find_compiler() is None:
                    break
        if lib is None:
            _errors[name] = "\n".join(failures)
            logger.warning("shardwise %s kernel unavailable, falling back to torch: %s", name, failures[0])
        elif failures:
            logger.warning("shardwise %s kernel built with reduced flags after: %s", name, failures[0])
        _loaded[name] = lib
        return lib


def _flag_variants() -> list[tuple[str, ...]]:
    """Full flags first; then portable code (a compiler that rejects ``-march=native``)."""
    return [DEFAULT_FLAGS, tuple(f for f in DEFAULT_FLAGS if f != "-march=native")]


def build_error(name: str) -> str | None:
    """Why kernel ``name`` could not be loaded in this process, or ``None``."""
    return _errors.get(name)
