"""Shared test set-up: offline, seeded, two threads, one tiny model per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def _temp_dir_under_pytest(tmp_path_factory):
    """What the tests, the code they run and its subprocesses put in the temp dir (the demo's
    work dirs, torchrun's rendezvous files) lands under pytest's own base temp, which pytest
    prunes to the last three runs, instead of piling up in /tmp run after run."""
    import tempfile

    path = str(tmp_path_factory.mktemp("tmp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", path)
        patch.setattr(tempfile, "tempdir", path)
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def load_script():
    """``load_script("build_default")``: a module of ``scripts/``, loaded from its file
    (the scripts are not a package), so a test can call its ``main(argv)`` or patch it."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny():
    """The ``tiny`` preset: random, built locally, image/audio/video in and out."""
    import mmllm

    return mmllm.load("tiny")


@pytest.fixture(scope="session")
def base_model():
    """A ``tiny`` model whose decoders are built once, for tests that train copies of it."""
    import mmllm

    model = mmllm.load("tiny")
    for d in model.decoders.values():
        d.encode_text(["warm up"])  # build the tiny pipelines once; copies share them
    return model


@pytest.fixture
def fresh(base_model):
    """``fresh(model)``: an independent copy of the model's modules; frozen decoders are shared."""

    def copy_of(model=base_model):
        return copy.deepcopy(model, memo={id(d): d for d in model.decoders.values()})

    return copy_of


@pytest.fixture
def force_first_signal():
    """``force_first_signal(model, modality)``: a logits processor that forces only the first
    signal token of ``modality`` at step 0, leaving the rest to the model's own completion."""

    def make(model, modality):
        first = model.signal_groups[modality][0]

        def proc(input_ids, scores):
            if input_ids.shape[1] == 0:
                scores = torch.full_like(scores, torch.finfo(scores.dtype).min)
                scores[:, first] = 0.0
            return scores

        return proc

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
