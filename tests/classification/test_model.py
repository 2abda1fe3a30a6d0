"""The model: weights sources, devices, and answers equal to torchvision's own pipeline."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import socket
import time
import urllib.error
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision

import classification.model
from classification import (
    Classifier,
    DeviceFailed,
    ModelLoadError,
    OutOfMemory,
    build_network,
    fold_batchnorm,
    load_classifier,
    load_labels,
    normalize_batch,
    preprocess,
    resolve_device,
)
from service.settings import PROJECT_ROOT
from tests import images
from tests.support import SEED, Reference, run_python

LABELS_FILE = PROJECT_ROOT / "imagenet_classes.txt"
MAX_PIXELS = 40_000_000


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return load_classifier(weights="random", labels_file=LABELS_FILE, device="cpu", seed=SEED)


def test_labels_file_has_the_imagenet_classes_in_index_order() -> None:
    labels = load_labels(LABELS_FILE)
    assert len(labels) == 1000
    assert labels[0] == "tench"
    assert labels[281] == "tabby"
    assert labels[999] == "toilet tissue"


def test_top5_matches_reference_on_photos(
    classifier: Classifier, reference: Reference, photos: list[Path]
) -> None:
    """One batch of all photos gives each photo the reference top-5 indices and scores."""
    inputs = [preprocess(path.read_bytes(), max_pixels=MAX_PIXELS) for path in photos]
    answers = classifier.classify(inputs, [5] * len(inputs))
    for path, answer in zip(photos, answers, strict=True):
        indices, scores = reference.top_k(images.photo(path), 5)
        assert [p.index for p in answer] == indices
        assert [p.score for p in answer] == pytest.approx(scores, rel=1e-3, abs=1e-6)
        assert [p.label for p in answer] == [classifier.labels[i] for i in indices]


def test_top_k_per_item_sorted_and_sized(classifier: Classifier, photos: list[Path]) -> None:
    pixels = preprocess(photos[0].read_bytes(), max_pixels=MAX_PIXELS)
    answers = classifier.classify([pixels, pixels, pixels], [1, 7, 1000])
    assert [len(a) for a in answers] == [1, 7, 1000]
    scores = [p.score for p in answers[2]]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-4)
    assert answers[0][0] == answers[1][0]


def test_random_weights_are_seeded() -> None:
    first, _ = build_network("random", 1000, seed=3)
    second, _ = build_network("random", 1000, seed=3)
    third, _ = build_network("random", 1000, seed=4)
    assert torch.equal(first.fc.weight, second.fc.weight)
    assert not torch.equal(first.fc.weight, third.fc.weight)


def test_the_loader_warns_of_random_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The model package knows where its weights come from: another package served in its
    place has no WEIGHTS setting to be warned of."""
    warning = (
        "WEIGHTS=random: the model's weights are random (seeded), so its answers are "
        "meaningless; for tests and smoke runs only"
    )
    path = tmp_path / "resnet18.pth"
    torch.save(build_network("random", 1000)[0].state_dict(), path)
    for weights, warned in ((" Random ", True), (str(path), False)):
        caplog.clear()
        load_classifier(weights=weights, labels_file=LABELS_FILE, device="cpu")
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert (warning in lines) is warned


def test_state_dict_file_loads(tmp_path: Path, classifier: Classifier, photos: list[Path]) -> None:
    network, _ = build_network("random", 1000, seed=SEED)
    path = tmp_path / "resnet18.pth"
    torch.save(network.state_dict(), path)
    from_file = load_classifier(weights=str(path), labels_file=LABELS_FILE, device="cpu")
    assert from_file.weights_description == "resnet18.pth"
    pixels = preprocess(photos[0].read_bytes(), max_pixels=MAX_PIXELS)
    assert from_file.classify([pixels], [5]) == classifier.classify([pixels], [5])


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda state: {"state_dict": state, "epoch": 7}, id="lightning"),
        pytest.param(lambda state: {"model": state, "optimizer": {}, "epoch": 7}, id="torchvision"),
        pytest.param(lambda state: {"model_state_dict": state, "epoch": 7}, id="tutorial"),
        pytest.param(
            lambda state: {f"module.{name}": value for name, value in state.items()},
            id="data-parallel",
        ),
        pytest.param(
            lambda state: {"model": {f"module.{name}": value for name, value in state.items()}},
            id="data-parallel-checkpoint",
        ),
    ],
)
def test_wrapped_checkpoint_and_custom_class_count(tmp_path: Path, wrap: Any) -> None:
    """Training checkpoints keep the weights under a key, and a network trained in
    (Distributed)DataParallel names each weight "module.": loaded as they are."""
    network, _ = build_network("random", 3, seed=1)
    path = tmp_path / "three.pth"
    torch.save(wrap(network.state_dict()), path)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    three = load_classifier(weights=str(path), labels_file=labels, device="cpu")
    assert torch.equal(three._network.fc.weight, network.fc.weight)
    answer = three.classify([np.zeros((224, 224, 3), np.uint8)], [3])[0]
    assert sorted(p.label for p in answer) == ["bird", "cat", "dog"]


def test_a_safetensors_file_loads(
    tmp_path: Path, classifier: Classifier, photos: list[Path]
) -> None:
    network, _ = build_network("random", 1000, seed=SEED)
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(network.state_dict(), path)
    from_file = load_classifier(weights=str(path), labels_file=LABELS_FILE, device="cpu")
    pixels = preprocess(photos[0].read_bytes(), max_pixels=MAX_PIXELS)
    assert from_file.classify([pixels], [5]) == classifier.classify([pixels], [5])


@pytest.mark.parametrize("name", ["resnet18.pth", "resnet18.bin"])
def test_a_safetensors_file_is_told_by_its_content_not_its_name(tmp_path: Path, name: str) -> None:
    network, _ = build_network("random", 1000, seed=SEED)
    path = tmp_path / name
    safetensors.torch.save_file(network.state_dict(), path)
    loaded, _ = build_network(str(path), 1000)
    assert torch.equal(loaded.fc.weight, network.fc.weight)


def test_a_torch_file_named_as_a_safetensors_file_loads(tmp_path: Path) -> None:
    network, _ = build_network("random", 1000, seed=SEED)
    path = tmp_path / "resnet18.safetensors"
    torch.save(network.state_dict(), path)
    loaded, _ = build_network(str(path), 1000)
    assert torch.equal(loaded.fc.weight, network.fc.weight)


def test_a_checkpoint_of_torchvisions_reference_training_script_loads(tmp_path: Path) -> None:
    """It saves the weights under "model" beside the optimizer's state and its own
    arguments, an argparse.Namespace."""
    network, _ = build_network("random", 1000, seed=SEED)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "model": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 30).state_dict(),
            "epoch": 89,
            "args": argparse.Namespace(model="resnet18", lr=0.1, data_path="/data"),
        },
        path,
    )
    loaded, _ = build_network(str(path), 1000)
    assert torch.equal(loaded.fc.weight, network.fc.weight)


def test_a_labels_file_with_a_byte_order_mark_reads_the_first_label_without_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("\ufefftench\ngoldfish\n", encoding="utf-8")
    assert load_labels(path) == ["tench", "goldfish"]


@pytest.mark.parametrize("keyword", [" random", "Random ", "random\t"])
def test_the_weights_keywords_may_have_blanks_around_them(keyword: str) -> None:
    assert build_network(keyword, 1000, seed=3)[1] == "random(seed=3)"


@pytest.mark.parametrize("keyword", ["RANDOM", "Random"])
def test_the_weights_keywords_are_read_whatever_their_case(keyword: str) -> None:
    _, description = build_network(keyword, 1000, seed=3)
    assert description == "random(seed=3)"


def test_label_count_must_match_weights(tmp_path: Path) -> None:
    network, _ = build_network("random", 10, seed=1)
    path = tmp_path / "ten.pth"
    torch.save(network.state_dict(), path)
    with pytest.raises(ModelLoadError, match="10 classes but LABELS_FILE has 1000 labels"):
        load_classifier(weights=str(path), labels_file=LABELS_FILE, device="cpu")


def save(value: object, path: Path) -> bytes:
    torch.save(value, path)
    return path.read_bytes()


@pytest.mark.parametrize("where", ["below a file", "a link loop", "a name too long"])
def test_a_weights_path_that_cannot_be_read_stops_start_up_with_one_line(
    tmp_path: Path, where: str
) -> None:
    """Where the file is, not what it holds: each is raised from pathlib or open, in the
    first check and again in the handler that looks at the file's first bytes, and would
    give a traceback in place of the line (a file without read permission, or in a folder
    the server's user cannot enter, alike)."""
    if where == "below a file":
        (tmp_path / "weights.pth").write_bytes(b"x")
        path = tmp_path / "weights.pth" / "resnet18.pth"
    elif where == "a link loop":
        path = tmp_path / "loop"
        path.symlink_to(tmp_path / "loop")
    else:
        path = tmp_path / ("w" * 300)
    with pytest.raises(ModelLoadError, match=r"cannot be read \(.+\); give a state-dict file"):
        load_classifier(weights=str(path), labels_file=LABELS_FILE, device="cpu")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("directory", r"is a directory; expected a file written by torch.save"),
        (b"", r"is an empty file; expected a file written by torch.save"),
        (b"not a checkpoint", r"is not a file written by torch.save; expected a file written by"),
        (b"plain text\nof two lines\n", "is not a file written by torch.save;"),
        ("whole model", "holds Python objects besides tensors"),
        pytest.param(
            # A plain pickle, of a protocol torch.save does not write: torch warns of it.
            pickle.dumps({"fc.weight": object()}, protocol=4),
            r"not a loadable state dict \(it holds Python objects besides tensors, or is not",
            id="pickle-protocol-4",
        ),
        ({"fc.weight": [1.0, 2.0]}, "'fc.weight' is not a tensor"),
        (
            "truncated",
            r"is a torch.save file whose zip archive cannot be read \(failed finding central "
            r"directory\): truncated or damaged\?$",
        ),
        (
            "torchscript",
            r"is a TorchScript archive \(torch.jit.save\), code besides the weights; save the "
            r"network's state_dict\(\) with torch.save",
        ),
        (
            "truncated safetensors",
            r"is a safetensors file that cannot be read \(\w+: .+\): truncated or damaged\?$",
        ),
        (
            "safetensors cut in its header",
            r"is a safetensors file that cannot be read \(\w+: .+\): truncated or damaged\?$",
        ),
        (
            "no layer4",
            r"does not fit ResNet18 \(25 missing keys \(layer4.0.conv1.weight, "
            r"layer4.0.bn1.weight, layer4.0.bn1.bias, \.\.\.\)\): weights of another network\?$",
        ),
        (
            "no classifier",
            r"does not fit ResNet18 \(2 missing keys \(fc.weight, fc.bias\)\): weights of another "
            r"network\?$",
        ),
        ({}, r"is not a ResNet18 state dict \(not a dict of tensors\)$"),
        (
            "wide conv1",
            r"does not fit ResNet18 \(1 tensor of another shape \(conv1.weight\)\)",
        ),
        (
            "resnet34",
            r"does not fit ResNet18 \(\d+ unexpected keys \(layer1.2.conv1.weight, [^)]*, "
            r"\.\.\.\)\): weights of another network\?$",
        ),
        ("nan", "not finite \\(NaN or infinite\\) in 'layer2.0.bn1.running_var'"),
        ("negative variance", "a negative variance in 'layer3.1.bn2.running_var'; the file is"),
        ("scalar fc", r"'fc.weight' has shape \(\), expected \(classes, 512\)"),
        ("meta fc", "'fc.weight' is a meta tensor, not a dense one"),
        ("complex fc", "'fc.weight' holds complex numbers"),
        ("float8 fc", "holds 'fc.bias' as float8_e4m3fn; save the weights as float32"),
        ("sparse fc", "'fc.weight' is a sparse_coo tensor, not a dense one"),
    ],
)
def test_bad_weights_files_stop_start_up_with_one_line(
    tmp_path: Path, content: object, message: str
) -> None:
    path = tmp_path / "weights.pth"
    network, _ = build_network("random", 1000)
    if content == "whole model":
        save(network, path)
    elif content == "truncated":
        path.write_bytes(save(network.state_dict(), path)[:100_000])
    elif content == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated
            torch.jit.save(torch.jit.script(network), path)
    elif content == "truncated safetensors":
        safetensors.torch.save_file(network.state_dict(), path)
        path.write_bytes(path.read_bytes()[:100_000])
    elif content == "safetensors cut in its header":
        safetensors.torch.save_file(network.state_dict(), path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "no classifier":
        save({k: v for k, v in network.state_dict().items() if not k.startswith("fc.")}, path)
    elif content == "no layer4":
        save({k: v for k, v in network.state_dict().items() if "layer4" not in k}, path)
    elif content == "nan":
        state = network.state_dict()
        state["layer2.0.bn1.running_var"][3] = float("nan")
        save(state, path)
    elif content == "negative variance":
        state = network.state_dict()
        state["layer3.1.bn2.running_var"][7] = -0.5
        save(state, path)
    elif content == "scalar fc":
        save({**network.state_dict(), "fc.weight": torch.tensor(1.0)}, path)
    elif content == "float8 fc":
        save(
            {**network.state_dict(), "fc.bias": network.fc.bias.detach().to(torch.float8_e4m3fn)},
            path,
        )
    elif content == "complex fc":
        complex_weight = network.fc.weight.detach().to(torch.complex64)
        save({**network.state_dict(), "fc.weight": complex_weight}, path)
    elif content == "meta fc":
        save({**network.state_dict(), "fc.weight": torch.empty(1000, 512, device="meta")}, path)
    elif content == "sparse fc":
        save({**network.state_dict(), "fc.weight": network.fc.weight.detach().to_sparse()}, path)
    elif content == "wide conv1":
        save({**network.state_dict(), "conv1.weight": torch.zeros(64, 3, 9, 9)}, path)
    elif content == "resnet34":
        save(torchvision.models.resnet34().state_dict(), path)
    elif content == "directory":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        save(content, path)
    with pytest.raises(ModelLoadError, match=message) as error:
        load_classifier(weights=str(path), labels_file=LABELS_FILE, device="cpu")
    assert "\n" not in str(error.value)
    assert "weights_only=False" not in str(error.value)
    assert len(str(error.value).replace(str(path), "")) < 350


def test_a_directory_named_as_a_safetensors_file_is_called_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.mkdir()
    with pytest.raises(ModelLoadError, match=r"weights.safetensors is a directory; expected"):
        load_classifier(weights=str(path), labels_file=LABELS_FILE, device="cpu")


def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where torch hub caches the ImageNet weights, in a torch home of ``tmp_path``."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints / "resnet18-f37072fd.pth"


def as_if_published(monkeypatch: pytest.MonkeyPatch) -> None:
    """Have the cached file pass for the published one, whose hash no test file can have."""
    monkeypatch.setattr(classification.model, "_check_published", lambda cached: None)


@pytest.mark.parametrize("network", ["resnet18", "resnet34"])
def test_a_cached_imagenet_file_that_is_not_the_published_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, network: str
) -> None:
    """Its name carries the published file's hash, which torch hub checks after a download
    only: any weights put there, even a ResNet18's, would be served as ImageNet's."""
    cached = hub_cache(tmp_path, monkeypatch)
    torch.save(getattr(torchvision.models, network)().state_dict(), cached)
    with pytest.raises(ModelLoadError) as error:
        load_classifier(weights="imagenet", labels_file=LABELS_FILE, device="cpu")
    message = str(error.value)
    assert message.startswith(
        f"the ResNet18 ImageNet weights cached at {cached} are not the published file "
        "(its SHA-256 begins "
    )
    assert message.endswith(
        ", not f37072fd); delete that file to download them again, or set "
        "WEIGHTS=/path/to/state_dict.pth to load a local file"
    )


def test_a_long_error_is_cut_at_a_word() -> None:
    cut = classification.model._first_line(RuntimeError("word " * 100))
    assert len(cut) <= 300
    assert cut.endswith("word...")


def test_labels_that_are_not_utf8_are_a_clear_error(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ModelLoadError, match="is not UTF-8 text"):
        load_classifier(weights="random", labels_file=labels, device="cpu")


def test_a_corrupt_cached_imagenet_file_says_to_delete_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_cache(tmp_path, monkeypatch).write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="delete that file to download them again") as error:
        load_classifier(weights="imagenet", labels_file=LABELS_FILE, device="cpu")
    assert "\n" not in str(error.value)


class RunsCode:
    """Unpickling this object runs a command: what a tampered checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("published", [False, True], ids=["as it is", "as if published"])
def test_the_cached_imagenet_file_is_loaded_as_weights_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, published: bool
) -> None:
    """The default weights come from torch hub's cache, which unpickles whatever it holds
    unless told to load tensors only: a tampered file is refused for its hash, and would
    be for the code it holds."""
    cached = hub_cache(tmp_path, monkeypatch)
    marker = tmp_path / "code-ran"
    torch.save({"fc.weight": RunsCode(marker)}, cached)
    if published:
        as_if_published(monkeypatch)
    message = "holds Python objects besides tensors" if published else "not the published file"
    with pytest.raises(ModelLoadError, match=message) as error:
        load_classifier(weights="imagenet", labels_file=LABELS_FILE, device="cpu")
    assert "\n" not in str(error.value)
    assert "weights_only=False" not in str(error.value)
    assert not marker.exists()


def test_imagenet_weights_offline_name_both_alternatives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not cached and not downloadable: one line that says how to fix it, and no other."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelLoadError) as error:
        load_classifier(weights="imagenet", labels_file=LABELS_FILE, device="cpu")
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path) in message
    assert "WEIGHTS=/path/to/state_dict.pth" in message
    assert "WEIGHTS=random" in message
    assert capsys.readouterr() == ("", "")  # torch hub's "Downloading: ..." is not shown


def test_a_weights_cache_that_cannot_be_read_stops_start_up_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looking for the cached file raises where its folder cannot be entered (a HOME of
    another user's, mode 0700, left set) or its path cannot be looked up at all."""
    torch_home = tmp_path / ("t" * 300)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    with pytest.raises(ModelLoadError) as error:
        load_classifier(weights="imagenet", labels_file=LABELS_FILE, device="cpu")
    message = str(error.value)
    assert message.startswith(f"the ResNet18 ImageNet weights' cache {torch_home}/")
    assert "cannot be read (File name too long); let this user read it" in message
    assert "WEIGHTS=/path/to/state_dict.pth" in message


def test_a_download_that_stalls_fails_with_the_line_that_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch hub's download has no timeout of its own: from a host that stops sending it
    would wait until gunicorn's timeout killed the worker, and the next worker wait
    again, the line saying what to do never shown."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(classification.model, "DOWNLOAD_STALL_S", 0.5)
    real_download = torch.hub.download_url_to_file
    # Takes the connection into its backlog and never answers.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/resnet18.pth"

        def from_a_silent_host(_: str, *args: Any, **kwargs: Any) -> None:
            real_download(url, *args, **kwargs)

        monkeypatch.setattr(torch.hub, "download_url_to_file", from_a_silent_host)
        started = time.monotonic()
        with pytest.raises(ModelLoadError) as error:
            load_classifier(weights="imagenet", labels_file=LABELS_FILE, device="cpu")
    assert time.monotonic() - started < 10
    assert "cannot be downloaded (nothing received for 0.5 s); set WEIGHTS=" in str(error.value)
    assert socket.getdefaulttimeout() is None


def test_imagenet_weights_load_from_the_torch_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    network, _ = build_network("random", 1000, seed=5)
    torch.save(network.state_dict(), hub_cache(tmp_path, monkeypatch))
    as_if_published(monkeypatch)
    loaded = load_classifier(weights="imagenet", labels_file=LABELS_FILE, device="cpu")
    assert loaded.weights_description == "imagenet"


def test_cuda_asked_for_where_torch_finds_none_says_why_when_torch_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def too_old_a_driver() -> bool:
        warnings.warn(
            "CUDA initialization: The NVIDIA driver on your system is too old.\nMore.",
            UserWarning,
            stacklevel=1,
        )
        return False

    monkeypatch.setattr(torch.cuda, "is_available", too_old_a_driver)

    with pytest.raises(ModelLoadError) as refused:
        resolve_device("cuda")
    assert str(refused.value) == (
        "DEVICE=cuda but no CUDA device is available (CUDA initialization: The NVIDIA driver "
        "on your system is too old.); use DEVICE=cpu"
    )


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu"])
def test_unknown_devices_are_refused(name: str) -> None:
    with pytest.raises(ModelLoadError, match="DEVICE"):
        resolve_device(name)


def test_auto_device_picks_what_exists() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        resolve_device("cuda")


def test_float16_needs_cuda() -> None:
    with pytest.raises(ModelLoadError, match=r"^DTYPE=float16 needs a CUDA device"):
        load_classifier(weights="random", labels_file=LABELS_FILE, device="cpu", dtype="float16")


def test_bfloat16_on_a_cpu_without_its_instructions_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Emulated, bfloat16 would be slower than float32: the start stops saying so."""
    monkeypatch.setattr(classification.model, "cpu_computes_bfloat16", lambda: False)
    with pytest.raises(ModelLoadError, match=r"^DTYPE=bfloat16 on the CPU needs AMX \(Intel Xeon"):
        load_classifier(weights="random", labels_file=LABELS_FILE, device="cpu", dtype="bfloat16")


native_bfloat16 = pytest.mark.skipif(
    not classification.model.cpu_computes_bfloat16(), reason="needs a CPU with AMX"
)


@pytest.mark.parametrize("variable", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
@pytest.mark.parametrize("below_amx", ["avx512_core", "AVX512_CORE_BF16"])
def test_bfloat16_is_refused_where_onednn_is_capped_below_amx(
    variable: str, below_amx: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Capped below AMX, oneDNN runs bfloat16 more slowly than float32 (AVX512_CORE_BF16:
    325 against 236 ms a batch of 16 on an AMX CPU; AVX512_CORE, emulated, 857 against 211 ms)
    whatever the CPU has; a cap at AMX or above leaves it to the CPU. oneDNN reads the cap
    upper-cased, blanks included: one with blanks caps nothing."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    by_the_cpu = classification.model.cpu_computes_bfloat16()
    monkeypatch.setenv(variable, below_amx)
    assert not classification.model.cpu_computes_bfloat16()
    with pytest.raises(ModelLoadError, match="ONEDNN_MAX_CPU_ISA rules out"):
        load_classifier(weights="random", labels_file=LABELS_FILE, device="cpu", dtype="bfloat16")
    for no_cap in ("AVX512_CORE_AMX", f" {below_amx} "):
        monkeypatch.setenv(variable, no_cap)
        assert classification.model.cpu_computes_bfloat16() == by_the_cpu


@native_bfloat16
def test_bfloat16_on_the_cpu_scores_as_float32_does(
    classifier: Classifier, photos: list[Path]
) -> None:
    in_bfloat16 = load_classifier(
        weights="random", labels_file=LABELS_FILE, device="cpu", dtype="bfloat16", seed=SEED
    )
    pixels = [preprocess(p.read_bytes(), max_pixels=MAX_PIXELS) for p in photos]
    for ours, reference in zip(
        in_bfloat16.classify(pixels, [5] * len(pixels)),
        classifier.classify(pixels, [5] * len(pixels)),
        strict=True,
    ):
        assert [p.score for p in ours] == pytest.approx([p.score for p in reference], rel=5e-2)


def test_channels_last_gives_the_same_answers(classifier: Classifier, photos: list[Path]) -> None:
    plain, _ = build_network("random", 1000, seed=SEED)
    contiguous = Classifier(plain, classifier.labels, device=torch.device("cpu"))
    pixels = [preprocess(p.read_bytes(), max_pixels=MAX_PIXELS) for p in photos]
    for ours, theirs in zip(
        classifier.classify(pixels, [5] * len(pixels)),
        contiguous.classify(pixels, [5] * len(pixels)),
        strict=True,
    ):
        assert [p.index for p in ours] == [p.index for p in theirs]
        assert [p.score for p in ours] == pytest.approx([p.score for p in theirs], rel=1e-3)


@pytest.mark.parametrize("architecture", ["resnet18", "resnet50"])
def test_folding_batchnorm_keeps_the_function(architecture: str, photos: list[Path]) -> None:
    """The served network has no BatchNorm left and computes the same logits; so does
    another torchvision ResNet, of bottleneck blocks, for a package serving one."""
    torch.manual_seed(SEED)
    network = getattr(torchvision.models, architecture)().eval()
    # Non-trivial statistics, so a wrong fold shows (fresh BatchNorms are identities).
    generator = torch.Generator().manual_seed(1)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)
    crops = np.stack([preprocess(p.read_bytes(), max_pixels=MAX_PIXELS) for p in photos])
    batch = normalize_batch(torch.from_numpy(crops))
    with torch.inference_mode():
        expected = network(batch)
        folded = fold_batchnorm(network)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        # Rounding grows with depth: within 1e-4 of the largest logit.
        scale = float(expected.abs().max())
        torch.testing.assert_close(folded(batch), expected, rtol=1e-4, atol=1e-4 * scale)
        # Folded again, it stays as it is.
        once = folded(batch)
        torch.testing.assert_close(fold_batchnorm(folded)(batch), once, rtol=0, atol=0)


def test_folding_batchnorm_refuses_a_network_it_does_not_know() -> None:
    """Rather than leave its BatchNorms as they were, unnoticed, or fail on a missing
    attribute."""
    with pytest.raises(TypeError, match="folds a torchvision ResNet's, not a"):
        fold_batchnorm(torchvision.models.mobilenet_v3_small().eval())  # type: ignore[arg-type]
    grouped = torchvision.models.resnet18(
        norm_layer=lambda channels: torch.nn.GroupNorm(8, channels)
    ).eval()
    before = {name: tensor.clone() for name, tensor in grouped.state_dict().items()}
    with pytest.raises(TypeError, match="folds BatchNorms, not a GroupNorm"):
        fold_batchnorm(grouped)
    after = grouped.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_matches_cpu(dtype: str, classifier: Classifier, photos: list[Path]) -> None:
    on_gpu = load_classifier(
        weights="random", labels_file=LABELS_FILE, device="cuda", dtype=dtype, seed=SEED
    )
    assert on_gpu.device.type == "cuda"
    if dtype == "float32":
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    pixels = [preprocess(p.read_bytes(), max_pixels=MAX_PIXELS) for p in photos]
    tolerance = 1e-3 if dtype == "float32" else 5e-2
    for gpu_answer, cpu_answer in zip(
        on_gpu.classify(pixels, [5] * len(pixels)),
        classifier.classify(pixels, [5] * len(pixels)),
        strict=True,
    ):
        assert gpu_answer[0].score == pytest.approx(cpu_answer[0].score, rel=tolerance)
        if dtype == "float32":
            assert [p.index for p in gpu_answer] == [p.index for p in cpu_answer]


@cuda
def test_a_batch_that_does_not_fit_on_the_gpu_stops_the_warm_up_saying_what_to_lower() -> None:
    """A real out-of-memory on the device (this process held to 256 MiB more than it has):
    the warm-up stops the start with one line, and the device still works after it."""
    on_gpu = load_classifier(weights="random", labels_file=LABELS_FILE, device="cuda", seed=SEED)
    index = torch.cuda.current_device()  # the memory fraction takes an index, not "cuda"
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(index).total_memory
    allowed = torch.cuda.memory_reserved(index) + 256 * 2**20
    torch.cuda.set_per_process_memory_fraction(allowed / total, index)
    try:
        with pytest.raises(ModelLoadError, match=r"^a batch of 512 does not fit in cuda"):
            on_gpu.warm_up([1, 512])
        assert len(on_gpu.classify([_crop()], [1])) == 1
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        torch.cuda.empty_cache()


@cuda
def test_waiting_for_the_gpu_leaves_the_cpu_core_free() -> None:
    """By default CUDA spins a core until the GPU is done, and each of several workers
    sharing one GPU would keep one busy: the wait sleeps. A float32 batch of 256 keeps the
    GPU busy for longer than stacking it and launching its kernels keep the thread."""
    on_gpu = load_classifier(weights="random", labels_file=LABELS_FILE, device="cuda", seed=SEED)
    crops = [_crop() for _ in range(256)]
    on_gpu.classify(crops, [1] * len(crops))  # cuDNN picks its algorithms
    cpu_started, started = time.thread_time(), time.perf_counter()
    for _ in range(3):
        on_gpu.classify(crops, [1] * len(crops))
    cpu, wall = time.thread_time() - cpu_started, time.perf_counter() - started
    assert cpu < 0.5 * wall, f"{cpu * 1000:.0f} ms of CPU in {wall * 1000:.0f} ms"


def _output_in_a_process_of_its_own(script: str) -> str:
    """Run ``script`` in a Python process of its own (a failed CUDA context cannot be
    mended), which must exit 0: what it printed."""
    finished = run_python(script, timeout_s=300)
    assert finished.returncode == 0, finished.stderr
    return finished.stdout


_DEVICE_ASSERT = """
import numpy as np, torch
from classification import DeviceFailed, load_classifier
from service.settings import PROJECT_ROOT

classifier = load_classifier(
    weights="random", labels_file=PROJECT_ROOT / "imagenet_classes.txt", device="cuda"
)
try:  # an index out of range: a device-side assert, after which the context is unusable
    torch.zeros(2, device="cuda")[torch.tensor([5], device="cuda")].sum().item()
except torch.AcceleratorError:
    pass
try:
    classifier.classify([np.zeros((224, 224, 3), np.uint8)], [1])
except DeviceFailed as failed:
    print("DeviceFailed:", str(failed).splitlines()[0])
"""


@cuda
def test_a_real_cuda_error_is_a_device_failure() -> None:
    """A device-side assert leaves the CUDA context unusable: the next batch raises
    ``DeviceFailed`` (the worker is then replaced), not an error of one batch. In a process
    of its own, as the context cannot be mended."""
    stdout = _output_in_a_process_of_its_own(_DEVICE_ASSERT)
    assert stdout.startswith("DeviceFailed: cuda failed: CUDA error: "), stdout


_FAULT_IN_THE_FORWARD = """
import gc, numpy as np, torch
from classification import DeviceFailed, load_classifier
from service.settings import PROJECT_ROOT

class OutOfRange(torch.nn.Module):
    def forward(self, batch):  # an index past the end: a device-side assert in the batch
        return batch.flatten(1)[:, torch.tensor([10**9], device=batch.device)].expand(-1, 1000)

classifier = load_classifier(
    weights="random", labels_file=PROJECT_ROOT / "imagenet_classes.txt", device="cuda"
)
classifier._network = OutOfRange()
try:
    classifier.classify([np.zeros((224, 224, 3), np.uint8)], [1])
except DeviceFailed as failed:
    print("DeviceFailed:", str(failed).splitlines()[0])
    del failed
gc.collect()  # what the batch left is freed in the failed context
print("freed")
"""


@cuda
def test_a_batch_whose_kernels_fail_is_a_device_failure_that_the_process_outlives() -> None:
    """The failure surfaces from the batch's own kernels, as ``DeviceFailed``, and freeing
    what the batch used after it does not abort the process (a pinned buffer freed in a
    failed context would): the worker can still answer what it holds and drain."""
    stdout = _output_in_a_process_of_its_own(_FAULT_IN_THE_FORWARD)
    assert stdout.startswith("DeviceFailed: cuda failed: CUDA error: "), stdout
    assert stdout.splitlines()[-1] == "freed"


def test_full_float32_on_cuda_turns_tf32_off_for_convolutions() -> None:
    cudnn = torch.backends.cudnn
    before = cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision
    cudnn.conv.fp32_precision = "tf32"
    try:
        classification.model.use_full_float32_on_cuda()
        assert cudnn.conv.fp32_precision == "ieee"
    finally:
        cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = before


class _FailingNetwork(torch.nn.Module):
    """A network whose every forward pass raises ``error``, as a failed GPU does."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        raise self.error


def _crop() -> np.ndarray:
    return np.zeros((224, 224, 3), np.uint8)


def test_a_device_error_is_a_device_failure_that_names_the_device() -> None:
    """A CUDA error other than running out of memory leaves the process's context unusable:
    it is told apart from a failure of one batch, so the worker can be replaced."""
    error = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    failing = Classifier(_FailingNetwork(error), ["a", "b"], device=torch.device("cpu"))

    with pytest.raises(DeviceFailed, match="cpu failed: CUDA error: an illegal") as raised:
        failing.classify([_crop()], [1])
    assert raised.value.__cause__ is error


@pytest.mark.parametrize("context_failed", [True, False], ids=["context failed", "context ok"])
def test_a_cudnn_error_is_a_device_failure_when_the_device_can_no_longer_run(
    monkeypatch: pytest.MonkeyPatch, context_failed: bool
) -> None:
    """A broken GPU context often shows first in cuDNN's or cuBLAS's own error, a plain
    RuntimeError: told apart by asking the device, it fails the worker (503, replaced), not
    the batch (500, the device called again on its halves). A cuDNN error of one batch on a
    device that still runs stays the batch's. (The device is a stand-in: no GPU here.)"""
    error = RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED_CUDART")
    failing = Classifier(_FailingNetwork(error), ["a", "b"], device=torch.device("cpu"))
    failing.device = torch.device("cuda", 0)
    waited = []

    def synchronize(device: torch.device) -> None:
        waited.append(device)
        if context_failed:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    if context_failed:
        with pytest.raises(DeviceFailed, match="cuda:0 failed: cuDNN error: CUDNN_STATUS_EXEC"):
            failing.classify([_crop()], [1])
    else:
        with pytest.raises(RuntimeError, match="CUDNN_STATUS_EXECUTION_FAILED") as raised:
            failing.classify([_crop()], [1])
        assert not isinstance(raised.value, DeviceFailed)
    assert waited == [torch.device("cuda", 0)]


def test_bfloat16_on_a_gpu_that_would_emulate_it_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before Ampere (compute capability 8.0), a GPU has no bfloat16 arithmetic of its own:
    float16 is the 16-bit choice there. (The GPU is a stand-in: none here.)"""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    network, _ = build_network("random", 2)
    with pytest.raises(ModelLoadError, match=r"^DTYPE=bfloat16 needs a GPU that computes it"):
        Classifier(network, ["a", "b"], device=torch.device("cuda", 0), dtype=torch.bfloat16)


def test_a_batch_error_on_the_cpu_asks_no_device_whether_it_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_cuda(device: torch.device) -> None:
        raise AssertionError("CUDA called on the CPU")

    monkeypatch.setattr(torch.cuda, "synchronize", no_cuda)
    failing = Classifier(
        _FailingNetwork(RuntimeError("bad")), ["a", "b"], device=torch.device("cpu")
    )
    with pytest.raises(RuntimeError, match=r"^bad$"):
        failing.classify([_crop()], [1])


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), None),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                "allocate memory: you tried to allocate 8 bytes. Error code 12 (Cannot "
                "allocate memory)"
            ),
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes. "
            "Error code 12 (Cannot allocate memory)",
        ),
        (MemoryError("std::bad_alloc"), None),
        (MemoryError(), "MemoryError"),
        (RuntimeError("could not create a primitive"), None),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"), None),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"), None),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED"), None),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), None),
        (torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors..."), None),
    ],
    ids=[
        *("cuda", "cpu allocator", "bad_alloc", "bare", "onednn", "cublas"),
        *("cudnn device", "cudnn host", "cudnn 8", "cuda error"),
    ],
)
def test_running_out_of_memory_is_out_of_memory_not_a_device_failure(
    error: Exception, reason: str | None
) -> None:
    """No image is at fault, and the device goes on working: the batch processor splits the
    batch, and a lone image's caller is told to retry."""
    failing = Classifier(_FailingNetwork(error), ["a", "b"], device=torch.device("cpu"))

    with pytest.raises(OutOfMemory) as raised:
        failing.classify([_crop(), _crop()], [1, 1])
    first_line = reason or str(error).splitlines()[0]
    assert str(raised.value) == f"cpu ran out of memory for a batch of 2: {first_line}"
    assert not isinstance(raised.value, DeviceFailed)


@pytest.mark.parametrize(
    "message",
    [
        "mat1 and mat2 shapes cannot be multiplied",
        "could not create a primitive descriptor for a convolution forward propagation "
        "primitive. Run workload with environment variable ONEDNN_VERBOSE=all to get "
        "additional diagnostic information.",
    ],
    ids=["shapes", "onednn descriptor"],
)
def test_other_errors_of_a_batch_pass_as_they_are(message: str) -> None:
    """Not memory: oneDNN's "descriptor" errors say it has no kernel for the setup, which
    fails the same way every time."""
    error = RuntimeError(message)
    failing = Classifier(_FailingNetwork(error), ["a", "b"], device=torch.device("cpu"))

    with pytest.raises(RuntimeError) as raised:
        failing.classify([_crop()], [1])
    assert raised.value is error


ALLOCATION_FAILS = """
import resource, numpy as np, torch
from classification import OutOfMemory, load_classifier
from pathlib import Path
labels = Path("imagenet_classes.txt")
classifier = load_classifier(weights="random", labels_file=labels, device="cpu")
crop = np.zeros((224, 224, 3), np.uint8)
classifier.classify([crop], [1])
with open("/proc/self/status") as status:
    vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
limit = (vm_kib << 10) + (256 << 20)  # room for batches of one, not for 64 images
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
try:
    classifier.classify([crop] * 64, [1] * 64)
except OutOfMemory as error:
    print("OutOfMemory:", error)
print("then:", [p[0].label for p in classifier.classify([crop, crop], [1, 1])])
"""


def test_a_batch_the_process_cannot_allocate_fails_as_out_of_memory_and_the_next_runs() -> None:
    """Torch's CPU allocator at the process's memory limit (ulimit -v), for real: the batch
    fails as ``OutOfMemory``, and with its tensors freed a smaller batch then runs."""
    result = run_python(ALLOCATION_FAILS, timeout_s=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        "OutOfMemory: cpu ran out of memory for a batch of 64: DefaultCPUAllocator: can't "
        "allocate memory: you tried to allocate "
    ), result.stdout + result.stderr
    assert lines[1].startswith("then: ['"), result.stdout + result.stderr


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            torch.AcceleratorError("CUDA error: no kernel image is available\nmore detail"),
            r"^the model cannot run on cpu \(CUDA error: no kernel image is available\); "
            r"torch \S+ runs on GPUs of the architectures .*; or use DEVICE=cpu$",
        ),
        (
            torch.OutOfMemoryError("CUDA out of memory"),
            r"^a batch of 8 does not fit in the memory this process may allocate; lower "
            r"MAX_BATCH_SIZE$",
        ),
    ],
)
def test_a_warm_up_the_device_cannot_run_is_a_load_error_that_says_what_to_do(
    error: Exception, message: str
) -> None:
    failing = Classifier(_FailingNetwork(error), ["a", "b"], device=torch.device("cpu"))

    with pytest.raises(ModelLoadError, match=message):
        failing.warm_up([1, 8])


def test_weights_that_overflow_once_batchnorm_is_folded_stop_the_warm_up(tmp_path: Path) -> None:
    """Every value finite, but a BatchNorm scale of 1e37 over a variance of 0 folds into a
    convolution weight beyond float32: every answer would be NaN, a 500. The warm-up sees
    it and start-up stops with one line."""
    network, _ = build_network("random", 1000)
    state = network.state_dict()
    state["bn1.weight"][0] = 1e37
    state["bn1.running_var"][0] = 0.0
    path = tmp_path / "overflow.pth"
    torch.save(state, path)
    classifier = load_classifier(weights=str(path), labels_file=LABELS_FILE, device="cpu")

    with pytest.raises(ModelLoadError) as refused:
        classifier.warm_up([1, 2])
    assert str(refused.value) == (
        "the model scores a blank image with NaN or infinity: its weights (overflow.pth) "
        "overflow float32 (BatchNorm is folded into the convolutions); check WEIGHTS and DTYPE"
    )


def test_a_model_the_cpu_cannot_build_says_so_whatever_the_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The network is built on the CPU before it moves to its device: the process's own
    memory limit is what stopped it, even with a GPU."""

    def no_room(*args: object) -> tuple[torch.nn.Module, str]:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9")

    monkeypatch.setattr(classification.model, "build_network", no_room)
    monkeypatch.setattr(classification.model, "resolve_device", lambda _: torch.device("cuda:0"))

    with pytest.raises(ModelLoadError) as refused:
        load_classifier(weights="random", labels_file=LABELS_FILE, device="cuda")
    assert str(refused.value) == (
        "the model does not fit in the memory this process may allocate; raise its limit"
    )


def test_a_weights_file_with_no_memory_to_load_is_not_called_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a good file at the process's memory limit: the limit is what to raise, not
    the file to replace."""
    path = tmp_path / "weights.pth"
    torch.save(build_network("random", 1000)[0].state_dict(), path)

    def no_room(*args: object, **kwargs: object) -> object:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9")

    monkeypatch.setattr(torch, "load", no_room)

    with pytest.raises(ModelLoadError) as refused:
        load_classifier(weights=str(path), labels_file=LABELS_FILE, device="cpu")
    assert str(refused.value) == (
        "the model does not fit in the memory this process may allocate; raise its limit"
    )


def test_a_weights_error_at_build_keeps_its_own_words(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="WEIGHTS=") as refused:
        load_classifier(weights=str(tmp_path / "missing.pth"), labels_file=LABELS_FILE)
    assert "does not fit in" not in str(refused.value)


@pytest.mark.parametrize(
    ("device", "error", "message"),
    [
        (
            "cuda:0",
            torch.OutOfMemoryError("CUDA out of memory"),
            "the model does not fit in cuda:0's free memory; lower WORKERS, or free the GPU",
        ),
        (
            "cpu",
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9"),
            "the model does not fit in the memory this process may allocate; raise its limit",
        ),
    ],
    ids=["cuda", "cpu"],
)
def test_a_model_that_does_not_fit_at_load_says_what_to_lower(
    monkeypatch: pytest.MonkeyPatch, device: str, error: Exception, message: str
) -> None:
    """Several workers share a GPU: running out of its memory is not a GPU torch cannot use.
    On the CPU, the process's own limit (ulimit -v) is what stops it."""

    def no_room(*args: object, **kwargs: object) -> Classifier:
        raise error

    monkeypatch.setattr(classification.model, "Classifier", no_room)
    monkeypatch.setattr(classification.model, "resolve_device", lambda _: torch.device(device))

    with pytest.raises(ModelLoadError) as refused:
        load_classifier(weights="random", labels_file=LABELS_FILE, device=device)
    assert str(refused.value) == message
