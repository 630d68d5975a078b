import pytest
import torch

# a tiny, quickly built toy pair: the pipeline is exercised, not the quality of the models
TINY = dict(n_train=200, n_val=16, n_test=16, teacher_steps=30, student_steps=10, batch_size=16)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    from ta_opd.tools.toy.build import ToySpec, load_or_build

    cache = tmp_path_factory.mktemp("toy_cache")
    return cache, load_or_build(cache, ToySpec(**TINY), log=lambda *_: None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
