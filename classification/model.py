"""ResNet18 loading and batched top-k classification."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import math
import os
import pickle
import re
import socket
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import ResNet, ResNet18_Weights, resnet18
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from classification.preprocess import CROP_SIZE, normalize_batch

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# oneDNN's instruction sets without AMX, at which ONEDNN_MAX_CPU_ISA may cap it.
ONEDNN_ISAS_WITHOUT_AMX = frozenset(
    {
        "SSE41",
        "AVX",
        "AVX2",
        "AVX2_VNNI",
        "AVX2_VNNI_2",
        "AVX512_CORE",
        "AVX512_CORE_VNNI",
        "AVX512_CORE_BF16",
        "AVX512_CORE_FP16",
        "AVX10_1_512",
        "AVX10_2_512",
    }
)
IMAGENET_WEIGHTS = ResNet18_Weights.IMAGENET1K_V1
# A download of the weights that receives nothing for this long fails, with the line that
# says what to do; torch hub would wait for ever, until gunicorn's timeout killed the
# worker, and the next one waited again.
DOWNLOAD_STALL_S = 30.0


class ModelLoadError(RuntimeError):
    """The model cannot be built as configured; the message says which setting to change."""


class DeviceFailed(RuntimeError):
    """The device failed in a way this process cannot recover from: a CUDA error other
    than running out of memory leaves the process's CUDA context unusable."""


class OutOfMemory(MemoryError):
    """The device had no memory for a batch (the GPU's, or the process's at its limit on
    the CPU). No image is at fault, and a smaller batch, or the same one later, may fit."""


# How a failed allocation is worded where it comes as a RuntimeError: torch's CPU
# allocator, CUDA's own error, and the workspaces of cuBLAS and cuDNN (9's two statuses,
# and 8's).
_ALLOCATION_FAILED = (
    "DefaultCPUAllocator: can't allocate memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)
# oneDNN's whole message when it cannot create the kernels of a batch size not run before,
# which is how its out-of-memory status reaches torch (it says no more, and other failed
# creations read the same); its "could not create a primitive descriptor ..." errors, a
# setup it has no kernel for, are not memory.
_ONEDNN_CREATION_FAILED = "could not create a primitive"


@dataclass(frozen=True, slots=True)
class Prediction:
    """One class of a top-k answer."""

    index: int
    label: str
    score: float


def load_labels(path: Path) -> list[str]:
    """Read one label per line, in class-index order."""
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of a label.
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise ModelLoadError(f"cannot read LABELS_FILE {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"LABELS_FILE {path} is not UTF-8 text") from None
    labels = [line.strip() for line in lines if line.strip()]
    if not labels:
        raise ModelLoadError(f"LABELS_FILE {path} holds no labels")
    return labels


def _cannot_run_on(device: torch.device, error: BaseException | None) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    return (
        f"the model cannot run on {device} ({first_line}); torch {torch.__version__} runs "
        f"on GPUs of the architectures {', '.join(torch.cuda.get_arch_list()) or 'none'} "
        "with a driver at least as new as its CUDA; or use DEVICE=cpu"
    )


def resolve_device(name: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"DEVICE={name!r} is not one of auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"DEVICE={name!r} is not one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            available = torch.cuda.is_available()
        if not available:
            # torch says why as a warning (a driver too old for its CUDA, say), if it knows.
            reasons = [line.strip() for w in caught for line in str(w.message).splitlines()]
            why = next((f" ({reason})" for reason in reasons if reason), "")
            raise ModelLoadError(
                f"DEVICE={name} but no CUDA device is available{why}; use DEVICE=cpu"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"DEVICE={name} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def _imagenet_cache() -> Path:
    """Where torch hub keeps the ImageNet weights once downloaded."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET_WEIGHTS.url).name


def _check_published(cached: Path) -> None:
    """Refuse a cached file that is not the one published: torch hub checks the hash its
    name carries after a download, not when it loads the file from the cache later."""
    if (match := torch.hub.HASH_REGEX.search(cached.name)) is None:
        return
    try:
        with cached.open("rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as exc:
        raise ModelLoadError(
            f"the ResNet18 ImageNet weights cached at {cached} cannot be read ({exc}); "
            "set WEIGHTS=/path/to/state_dict.pth to load a local file"
        ) from None
    published = match.group(1)
    if not digest.startswith(published):
        raise ModelLoadError(
            f"the ResNet18 ImageNet weights cached at {cached} are not the published file "
            f"(its SHA-256 begins {digest[: len(published)]}, not {published}); delete that "
            "file to download them again, or set WEIGHTS=/path/to/state_dict.pth to load a "
            "local file"
        )


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    cached = _imagenet_cache()
    try:
        downloading = not cached.is_file()
    except OSError as exc:  # a cache folder this user cannot enter, say
        raise ModelLoadError(
            f"the ResNet18 ImageNet weights' cache {cached} cannot be read "
            f"({exc.strerror or exc}); let this user read it (TORCH_HOME says where it is), "
            "or set WEIGHTS=/path/to/state_dict.pth to load a local file"
        ) from None
    if not downloading:
        _check_published(cached)
    default_timeout = socket.getdefaulttimeout()
    try:
        # torch hub opens its connection with the process's default timeout: none. Set
        # here, while the model loads and the worker has no other connection to open.
        socket.setdefaulttimeout(DOWNLOAD_STALL_S)
        # torch hub prints "Downloading: ..." before it tries: offline, a line
        # before the one that says what to do. A download that works is logged below.
        with contextlib.redirect_stdout(io.StringIO()):
            # weights_only: torch hub would otherwise unpickle the cached file, running
            # whatever code it holds.
            loaded = IMAGENET_WEIGHTS.get_state_dict(
                progress=False, check_hash=True, map_location="cpu", weights_only=True
            )
    except Exception as exc:
        if cached.is_file():  # torch hub loads a cached file without checking its hash
            raise ModelLoadError(
                f"the ResNet18 ImageNet weights cached at {cached} cannot be loaded "
                f"({_load_failure(exc)}); delete that file to download them again, or set "
                "WEIGHTS=/path/to/state_dict.pth to load a local file"
            ) from None
        reason = getattr(exc, "reason", None) or _first_line(exc)  # URLError has a reason
        if isinstance(reason, TimeoutError) or isinstance(exc, TimeoutError):
            reason = f"nothing received for {DOWNLOAD_STALL_S:g} s"
        raise ModelLoadError(
            f"ResNet18 ImageNet weights are not cached at {cached} and cannot be downloaded "
            f"({reason}); set WEIGHTS=/path/to/state_dict.pth to load a local file, "
            "or WEIGHTS=random for offline smoke tests"
        ) from None
    finally:
        socket.setdefaulttimeout(default_timeout)
    if downloading:
        logger.info(
            "downloaded the ResNet18 ImageNet weights from %s to %s", IMAGENET_WEIGHTS.url, cached
        )
    return _checked_state_dict(loaded, f"the file cached at {cached}")


LOADABLE_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# Where training checkpoints keep the weights: Lightning, torchvision's reference scripts,
# the PyTorch tutorials.
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")
# A network saved wrapped in DataParallel or DistributedDataParallel names every weight so.
WRAPPED_PREFIX = "module."
# The longest JSON header the safetensors library reads.
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    expected = (
        "expected a file written by torch.save(model.state_dict(), path), or a safetensors file"
    )
    safetensors_file = False
    try:
        if path.is_dir():
            raise ModelLoadError(f"WEIGHTS={path} is a directory; {expected}")
        if path.is_file() and path.stat().st_size == 0:
            raise ModelLoadError(f"WEIGHTS={path} is an empty file; {expected}")
        if safetensors_file := _is_safetensors(path):
            loaded = safetensors.torch.load_file(path, device="cpu")
        else:
            with (
                warnings.catch_warnings(),
                # torchvision's reference training script saves its arguments beside the
                # weights: plain values, safe to read.
                torch.serialization.safe_globals([argparse.Namespace]),
                path.open("rb") as file,
            ):
                # A sparse tensor is refused below, and a file that is no state dict (a
                # plain pickle) too: their warnings would be a second line.
                warnings.filterwarnings("ignore", "Validating sparse tensor invariants")
                warnings.filterwarnings("ignore", "Detected pickle protocol")
                warnings.filterwarnings("ignore", ".* looks like a TorchScript archive")
                # From a file object: torch.load reads a path named *.safetensors as one.
                loaded = torch.load(file, map_location="cpu", weights_only=True)
    except ModelLoadError:
        raise
    except FileNotFoundError:
        raise ModelLoadError(
            f"WEIGHTS={path} does not exist; give a state-dict file, 'imagenet' or 'random'"
        ) from None
    except OSError as exc:
        # Not a file's content, but where it is: a file without read permission, one in a
        # folder this user cannot enter, a path through a file or a link loop.
        raise ModelLoadError(
            f"WEIGHTS={path} cannot be read ({exc.strerror or exc}); give a state-dict file "
            "this user can read, 'imagenet' or 'random'"
        ) from None
    except Exception as exc:
        if is_out_of_memory(exc):
            raise  # not the file's fault: ``load_classifier`` says to raise the limit
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
            raise ModelLoadError(
                f"WEIGHTS={path} holds Python objects besides tensors (a whole pickled "
                "model?); save its state_dict() and point WEIGHTS at that file"
            ) from None
        if safetensors_file:
            raise ModelLoadError(
                f"WEIGHTS={path} is a safetensors file that cannot be read "
                f"({_load_failure(exc)}): truncated or damaged?"
            ) from None
        if not _starts_as_torch_file(path):
            # What the legacy format's unpickler says of other bytes (KeyError: 101)
            # means nothing to whoever set WEIGHTS.
            raise ModelLoadError(
                f"WEIGHTS={path} is not a file written by torch.save; {expected}"
            ) from None
        if _is_torchscript(path):
            # torch's own words point at weights_only, which would not load it either.
            raise ModelLoadError(
                f"WEIGHTS={path} is a TorchScript archive (torch.jit.save), code besides the "
                "weights; save the network's state_dict() with torch.save and point WEIGHTS "
                "at that file"
            ) from None
        if damage := _ZIP_READ_FAILURE.search(str(exc)):
            # torch's words go on about its zip library's internals.
            raise ModelLoadError(
                f"WEIGHTS={path} is a torch.save file whose zip archive cannot be read "
                f"({damage.group(1)}): truncated or damaged?"
            ) from None
        raise ModelLoadError(
            f"WEIGHTS={path} is not a loadable state dict ({_load_failure(exc)}); {expected}"
        ) from None
    if isinstance(loaded, dict) and "fc.weight" not in loaded:
        wrapper = next((k for k in CHECKPOINT_KEYS if isinstance(loaded.get(k), dict)), None)
        if wrapper is not None:
            loaded = loaded[wrapper]
    if (
        isinstance(loaded, dict)
        and loaded
        and all(isinstance(name, str) and name.startswith(WRAPPED_PREFIX) for name in loaded)
    ):
        loaded = {name.removeprefix(WRAPPED_PREFIX): value for name, value in loaded.items()}
    return _checked_state_dict(loaded, f"WEIGHTS={path}")


def _is_safetensors(path: Path) -> bool:
    """Whether the file begins as a safetensors file, whatever its name: the length of a
    JSON header (8 bytes, little-endian) within safetensors' bound, then the header's
    brace. A file cut off inside its header still does."""
    with path.open("rb") as file:
        start = file.read(9)
    header_bytes = int.from_bytes(start[:8], "little")
    return len(start) == 9 and start[8:] == b"{" and header_bytes <= SAFETENSORS_MAX_HEADER_BYTES


# How torch says that the zip archive torch.save writes cannot be read, and why.
_ZIP_READ_FAILURE = re.compile(r"failed reading zip archive: ([^.]+)")


def _is_torchscript(path: Path) -> bool:
    """Whether the file is a zip archive as torch.jit.save writes, which holds the
    network's code (``code/``) and its constants beside the weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _starts_as_torch_file(path: Path) -> bool:
    """Whether the file begins as torch.save writes: a zip archive, or (the legacy format)
    a pickle. Truncated or damaged, it still does."""
    with path.open("rb") as file:
        start = file.read(4)
    return start == b"PK\x03\x04" or start[:1] == b"\x80"


def _checked_state_dict(loaded: object, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(loaded, dict) or not loaded:
        raise ModelLoadError(f"{source} is not a ResNet18 state dict (not a dict of tensors)")
    for name, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(
                f"{source} is not a ResNet18 state dict ({name!r} is not a tensor)"
            )
        if value.is_complex():
            # Copied into the network's real weights, its imaginary part would be dropped.
            raise ModelLoadError(
                f"{source} is not a ResNet18 state dict ({name!r} holds complex numbers)"
            )
        if value.is_floating_point() and value.dtype not in LOADABLE_FLOAT_DTYPES:
            # float8: no finiteness check or copy into the network runs on it.
            raise ModelLoadError(
                f"{source} holds {name!r} as {str(value.dtype).removeprefix('torch.')}; "
                "save the weights as float32, float16 or bfloat16"
            )
        # A sparse or meta tensor (one with no values) fails every check and copy below.
        if value.layout is not torch.strided or value.is_meta:
            kind = "meta" if value.is_meta else str(value.layout).removeprefix("torch.")
            raise ModelLoadError(
                f"{source} is not a ResNet18 state dict ({name!r} is a {kind} tensor, "
                "not a dense one)"
            )
    classifier_weight = loaded.get("fc.weight")  # without it, listed with the missing keys
    if classifier_weight is not None and classifier_weight.dim() != 2:
        raise ModelLoadError(
            f"{source} does not fit ResNet18: 'fc.weight' has shape "
            f"{tuple(classifier_weight.shape)}, expected (classes, 512)"
        )
    return loaded


def _load_failure(error: BaseException) -> str:
    """Why torch.load failed, in a few words. Its own message for a file of Python objects
    goes on for lines and suggests weights_only=False, which would run the code they hold."""
    if isinstance(error, pickle.UnpicklingError):
        return "it holds Python objects besides tensors, or is not a torch file"
    if not str(error).strip():
        return type(error).__name__
    return f"{type(error).__name__}: {_shortened(_first_line(error), 160)}"


def _first_line(error: BaseException) -> str:
    """An error's message cut to one line, for start-up errors that must fit on one."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return _shortened(lines[0], 300)


def _shortened(text: str, limit: int) -> str:
    """``text``, cut at a word to at most ``limit`` characters, with "..." if it was cut."""
    if len(text) <= limit:
        return text
    return text[: limit - 3].rsplit(" ", 1)[0].rstrip(",;") + "..."


def build_network(weights: str, num_labels: int, seed: int = 0) -> tuple[nn.Module, str]:
    """Build ResNet18 from ``imagenet``, ``random`` (seeded) or a state-dict path.

    Returns:
        The network on the CPU in eval mode, and a short description of its weights.
    """
    if weights.strip().lower() in ("random", "imagenet"):
        weights = weights.strip().lower()  # a file of that name would be ./random
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = resnet18(num_classes=num_labels)
        return network.eval(), f"random(seed={seed})"

    if weights == "imagenet":
        state, description = _imagenet_state_dict(), "imagenet"
        source, mend = f"the ImageNet weights cached at {_imagenet_cache()}", "; delete that file"
    else:
        path = Path(weights).expanduser()
        state, description = _file_state_dict(path), path.name
        source, mend = f"WEIGHTS={weights}", ""
    not_finite = next(
        (
            name
            for name, value in state.items()
            if value.is_floating_point() and not value.isfinite().all()
        ),
        None,
    )
    if not_finite is not None:
        # Every answer would be NaN, served as a null score.
        raise ModelLoadError(
            f"{source} holds values that are not finite (NaN or infinite) in "
            f"{not_finite!r}; the file is corrupt, or its training diverged{mend}"
        )
    negative = next(
        (
            name
            for name, value in state.items()
            if name.endswith(".running_var") and value.is_floating_point() and (value < 0).any()
        ),
        None,
    )
    if negative is not None:
        # Its square root is NaN: every answer would be.
        raise ModelLoadError(
            f"{source} holds a negative variance in {negative!r}; the file is corrupt{mend}"
        )
    # A state dict without its classifier is refused below, its keys listed as missing.
    num_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else num_labels
    if num_classes != num_labels:
        raise ModelLoadError(
            f"WEIGHTS={weights} has {num_classes} classes but LABELS_FILE has {num_labels} "
            "labels; point LABELS_FILE at the matching label list"
        )
    network = resnet18(num_classes=num_classes)
    expected = network.state_dict()
    misshapen = [
        name
        for name, value in state.items()
        if name in expected and value.shape != expected[name].shape
    ]
    missing: list[str] = []
    unexpected: list[str] = []
    if not misshapen:
        try:
            # Not strict, so that what does not fit is listed below in a few words (torch
            # lists every key, a line each: 96 for a ResNet34's), and raised.
            loaded = network.load_state_dict(state, strict=False)
        except Exception as exc:  # a file's tensors can fail a copy in ways of their own
            if is_out_of_memory(exc):
                raise
            raise ModelLoadError(
                f"{source} does not fit ResNet18 ({_first_line(exc)}){mend}"
            ) from None
        missing, unexpected = loaded.missing_keys, loaded.unexpected_keys
    if misfits := _misfits(missing, unexpected, misshapen):
        raise ModelLoadError(
            f"{source} does not fit ResNet18 ({misfits}): weights of another network?{mend}"
        )
    return network.eval(), description


def _misfits(missing: list[str], unexpected: list[str], misshapen: list[str]) -> str:
    """What keeps a state dict from loading, in a few words; "" if nothing."""

    def some(one: str, many: str, names: list[str]) -> str:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"{len(names)} {one if len(names) == 1 else many} ({shown})"

    found = [
        some(one, many, names)
        for one, many, names in (
            ("missing key", "missing keys", missing),
            ("unexpected key", "unexpected keys", unexpected),
            ("tensor of another shape", "tensors of another shape", misshapen),
        )
        if names
    ]
    return "; ".join(found)


def fold_batchnorm(network: ResNet) -> ResNet:
    """Fold every BatchNorm of an eval-mode torchvision ResNet into the convolution before
    it.

    The same function up to float rounding, with twenty fewer passes over the activations
    in ResNet18: 10-20 % faster forwards on CPU. Changes ``network`` in place and returns it;
    a network folded already is left as it is.

    Raises:
        TypeError: ``network`` is no torchvision ResNet (whose layout this knows), or
            normalises with something else than BatchNorm (a GroupNorm, which does not
            fold); it is left unchanged.
    """
    if not isinstance(network, ResNet):
        raise TypeError(f"fold_batchnorm folds a torchvision ResNet's, not a {type(network)}'s")
    pairs: list[tuple[nn.Module, str, str]] = [(network, "conv1", "bn1")]
    for block in network.modules():
        if isinstance(block, BasicBlock | Bottleneck):
            layers = 3 if isinstance(block, Bottleneck) else 2
            pairs.extend((block, f"conv{n}", f"bn{n}") for n in range(1, layers + 1))
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    unfolded = [pair for pair in pairs if not isinstance(getattr(pair[0], pair[2]), nn.Identity)]
    for owner, _, norm_name in unfolded:
        if not isinstance(norm := getattr(owner, norm_name), nn.BatchNorm2d | FrozenBatchNorm2d):
            raise TypeError(f"fold_batchnorm folds BatchNorms, not a {type(norm).__name__}")
    network.eval()
    for owner, conv_name, norm_name in unfolded:
        conv, norm = getattr(owner, conv_name), getattr(owner, norm_name)
        setattr(owner, conv_name, fuse_conv_bn_eval(conv, norm))
        setattr(owner, norm_name, nn.Identity())
    return network


def cpu_computes_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions faster than float32 here: on AMX tiles,
    which this CPU must have and ``ONEDNN_MAX_CPU_ISA`` must not rule out. Without them the
    network runs more slowly in bfloat16 than in float32: capped at AVX512_CORE_BF16 on an
    AMX CPU, a batch of 16 took 325 ms against 236 ms in float32."""
    # oneDNN reads the variable upper-cased, blanks included.
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if capped.upper() in ONEDNN_ISAS_WITHOUT_AMX:
        return False
    # torch's own check, as its compiler uses it; there is no public API for it.
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return has_amx is not None and bool(has_amx())


# The first GPUs whose tensor cores compute bfloat16 (Ampere); older ones emulate it.
BFLOAT16_CUDA_CAPABILITY = (8, 0)


def use_full_float32_on_cuda() -> None:
    """Make cuDNN's float32 convolutions IEEE float32, in this process.

    By default they may run in TF32, ten bits of mantissa: answers then differ from the
    CPU's in near ties (3 of 264 photo variants changed their top-1 on an H200).
    ``DTYPE=float32`` promises float32; a 16-bit ``DTYPE`` is the choice for speed.

    It is set with torch's current API. Once it is, torch's legacy
    ``torch.backends.cudnn.allow_tf32`` (and ``cudnn.flags()``, which reads it) raises in
    this process; nothing here reads them, and a worker holds one model.
    """
    # The convolutions' own setting, which a cuDNN-wide one set earlier does not override.
    torch.backends.cudnn.conv.fp32_precision = "ieee"


class Classifier:
    """ResNet18 in inference mode on one device, answering top-k for batches of images.

    Not thread-safe for concurrent ``classify`` calls on CUDA streams; call it from one
    worker thread at a time.
    """

    def __init__(
        self,
        network: nn.Module,
        labels: Sequence[str],
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        weights_description: str = "",
    ) -> None:
        if device.type == "cpu" and dtype == torch.float16:
            raise ModelLoadError(
                "DTYPE=float16 needs a CUDA device; on the CPU use DTYPE=float32, or "
                "bfloat16 where the CPU has AMX"
            )
        if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_computes_bfloat16():
            raise ModelLoadError(
                "DTYPE=bfloat16 on the CPU needs AMX (Intel Xeon since Sapphire Rapids), which "
                "this CPU lacks or ONEDNN_MAX_CPU_ISA rules out (without it, bfloat16 runs more "
                "slowly than float32); use DTYPE=float32"
            )
        if (
            device.type == "cuda"
            and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) < BFLOAT16_CUDA_CAPABILITY
        ):
            raise ModelLoadError(
                f"DTYPE=bfloat16 needs a GPU that computes it (compute capability 8.0 or newer, "
                f"since Ampere); {device} would emulate it, more slowly than float16: use "
                "DTYPE=float16"
            )
        self.labels = list(labels)
        self.device = device
        self.dtype = dtype
        self.weights_description = weights_description
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if device.type == "cuda" and dtype == torch.float32:
            use_full_float32_on_cuda()
        self._network = network.to(device=device, dtype=dtype, memory_format=self._memory_format)
        self._network.eval()
        # Large enough that adding to it runs on every intra-op thread (wake_threads).
        self._wake_buffer = torch.empty(1 << 17) if device.type == "cpu" else None
        # Waits for the GPU by sleeping: by default CUDA spins a core until the GPU is done,
        # and each of several workers sharing one GPU would keep a core busy while it waits.
        self._gpu_done = torch.cuda.Event(blocking=True) if device.type == "cuda" else None

    def wake_threads(self) -> None:
        """Start the CPU's OpenMP threads ahead of a forward pass that is about to come.

        After an idle spell they sleep, and a forward that has to wake them is slower.
        Call it from the thread that runs ``classify`` (a second thread using torch would
        start OpenMP threads of its own); on CUDA it does nothing.
        """
        if self._wake_buffer is not None:
            self._wake_buffer.add_(0)

    @property
    def num_classes(self) -> int:
        """How many classes the model scores."""
        return len(self.labels)

    @property
    def dtype_name(self) -> str:
        """The compute dtype, as configured (``float32``, ``float16``, ``bfloat16``)."""
        return _dtype_name(self.dtype)

    def warm_up(self, batch_sizes: Sequence[int]) -> dict[int, float]:
        """Run throwaway forwards so the first real request pays no one-off costs.

        Returns:
            Seconds a warm batch of each size takes: the faster of two runs, since workers
            starting together (on one GPU, or on shared cores) slow each other.
        """
        dummies = {
            size: [np.zeros((CROP_SIZE, CROP_SIZE, 3), np.uint8) for _ in range(size)]
            for size in batch_sizes
        }
        try:
            for dummy in dummies.values():
                predictions = self.classify(dummy, [1] * len(dummy))
                if not all(math.isfinite(image[0].score) for image in predictions):
                    # Finite weights can still overflow: once BatchNorm is folded into the
                    # convolutions, or in a 16-bit DTYPE. Every answer would be a 500.
                    raise ModelLoadError(
                        f"the model scores a blank image with NaN or infinity: its weights "
                        f"({self.weights_description}) overflow {self.dtype_name} "
                        "(BatchNorm is folded into the convolutions); check WEIGHTS and DTYPE"
                    )
            run_times = {}
            for size, dummy in dummies.items():
                durations = []
                for _ in range(2):
                    started = time.perf_counter()
                    self.classify(dummy, [1] * size)
                    durations.append(time.perf_counter() - started)
                run_times[size] = min(durations)
        except OutOfMemory:
            # Workers share a GPU's memory; on the CPU the limit is each process's own.
            lower = "MAX_BATCH_SIZE, or WORKERS" if self.device.type == "cuda" else "MAX_BATCH_SIZE"
            raise ModelLoadError(
                f"a batch of {max(batch_sizes)} does not fit in {_free_memory(self.device)}; "
                f"lower {lower}"
            ) from None
        except DeviceFailed as exc:
            raise ModelLoadError(_cannot_run_on(self.device, exc.__cause__)) from None
        return run_times

    @torch.inference_mode()
    def classify(
        self, images: Sequence[np.ndarray], top_k: Sequence[int]
    ) -> list[list[Prediction]]:
        """Classify preprocessed images in one forward pass.

        Args:
            images: uint8 crops of shape (224, 224, 3), as made by ``preprocess``.
            top_k: How many classes to return for each image.

        Returns:
            For each image, its ``top_k`` predictions sorted by descending score.

        Raises:
            OutOfMemory: The device had no memory for the batch; a smaller one may fit.
            DeviceFailed: The device can run nothing more in this process.
        """
        if len(images) != len(top_k):
            raise ValueError(f"{len(images)} images but {len(top_k)} top_k values")
        try:
            score_rows, index_rows = self._top_scores(images, max(top_k))
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                if isinstance(exc, torch.AcceleratorError) or self._device_failed():
                    raise DeviceFailed(f"{self.device} failed: {exc}") from exc
                raise
            # Without the "[enforce fail at alloc_cpu.cpp:...] err == 0." of torch's CPU check.
            reason = _first_line(exc).partition("] err == 0. ")[2] or _first_line(exc)
        else:
            return [
                [
                    Prediction(index, self.labels[index], score)
                    for index, score in zip(index_row[:k], score_row[:k], strict=True)
                ]
                for index_row, score_row, k in zip(index_rows, score_rows, top_k, strict=True)
            ]
        # Raised past the handler, whose error's traceback holds the batch's tensors: they
        # are freed before anything tries again.
        raise OutOfMemory(f"{self.device} ran out of memory for a batch of {len(images)}: {reason}")

    def _device_failed(self) -> bool:
        """Whether the device itself failed, where a batch's error does not say so: a GPU
        whose context broke shows it first in cuDNN's or cuBLAS's own error (a plain
        RuntimeError) as often as in CUDA's, and from then on in every CUDA call."""
        if self.device.type != "cuda":
            return False
        try:
            torch.cuda.synchronize(self.device)
        except RuntimeError:
            return True
        return False

    def _top_scores(
        self, images: Sequence[np.ndarray], k: int
    ) -> tuple[list[list[float]], list[list[int]]]:
        """Each image's ``k`` best scores and their class indices, best first."""
        if self._gpu_done is None:
            batch = torch.from_numpy(np.stack(images))
        else:
            # uint8 crosses the bus, a quarter of the bytes of the float input, stacked
            # straight into pinned memory: numpy's copy, so no torch work runs on the CPU.
            pinned = torch.empty(
                (len(images), *images[0].shape), dtype=torch.uint8, pin_memory=True
            )
            np.stack(images, out=pinned.numpy())
            batch = pinned.to(self.device, non_blocking=True)
            # Freed now, before any kernel of the batch can fail: freeing a pinned buffer
            # records a CUDA event, which in a failed context raises where nothing can catch
            # it, and the process would abort.
            del pinned
        batch = normalize_batch(batch).to(dtype=self.dtype, memory_format=self._memory_format)
        probabilities = self._network(batch).float().softmax(dim=1)
        scores, indices = probabilities.topk(k, dim=1)
        if self._gpu_done is not None:
            self._gpu_done.record(torch.cuda.current_stream(self.device))
            self._gpu_done.synchronize()  # a failure of the batch's kernels raises here
        # Into pageable memory, which holds no CUDA event: after the wait, a short copy.
        return scores.cpu().tolist(), indices.cpu().tolist()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether torch failed to allocate: on CUDA, or on the CPU (a RuntimeError, or a
    MemoryError from a C++ ``std::bad_alloc``). CUDA's own "out of memory" error leaves the
    device usable, unlike its other errors. A model's ``classify`` raises ``OutOfMemory``
    for such an error, which the batcher and the service tell from a failed image."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error)
    return message.strip() == _ONEDNN_CREATION_FAILED or any(
        words in message for words in _ALLOCATION_FAILED
    )


def _free_memory(device: torch.device) -> str:
    """Where a model's memory comes from, in an error message."""
    if device.type == "cpu":
        return "the memory this process may allocate"
    return f"{device}'s free memory"


def _as_load_error(device: torch.device, error: BaseException) -> ModelLoadError | None:
    """The ``ModelLoadError`` that says what to do when building or placing the model on
    ``device`` failed for want of memory, or because torch cannot run there; else None."""
    if isinstance(error, ModelLoadError):
        return None
    if is_out_of_memory(error):
        remedy = "lower WORKERS, or free the GPU" if device.type == "cuda" else "raise its limit"
        return ModelLoadError(f"the model does not fit in {_free_memory(device)}; {remedy}")
    if isinstance(error, torch.AcceleratorError):
        return ModelLoadError(_cannot_run_on(device, error))
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def load_classifier(
    *,
    weights: str,
    labels_file: Path,
    device: str = "auto",
    dtype: str = "float32",
    channels_last: bool = True,
    seed: int = 0,
) -> Classifier:
    """Build a ready ``Classifier`` from configuration values.

    Raises:
        ModelLoadError: A setting cannot be honoured; the message names the setting.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"DTYPE={dtype!r} is not one of {', '.join(DTYPES)}")
    labels = load_labels(labels_file)
    target = resolve_device(device)
    cpu = torch.device("cpu")
    try:  # built on the CPU, whatever the device
        network, description = build_network(weights, len(labels), seed)
        network = fold_batchnorm(network)
    except (RuntimeError, MemoryError) as exc:
        if (load_error := _as_load_error(cpu, exc)) is None:
            raise
        raise load_error from None
    try:
        classifier = Classifier(
            network,
            labels,
            device=target,
            dtype=DTYPES[dtype],
            channels_last=channels_last,
            weights_description=description,
        )
    except (RuntimeError, MemoryError) as exc:
        if (load_error := _as_load_error(target, exc)) is None:
            raise
        raise load_error from None
    logger.info(
        "model ready: resnet18 weights=%s device=%s dtype=%s channels_last=%s",
        description,
        target,
        dtype,
        channels_last,
    )
    if weights.strip().lower() == "random":
        logger.warning(
            "WEIGHTS=random: the model's weights are random (seeded), so its answers are "
            "meaningless; for tests and smoke runs only"
        )
    return classifier
