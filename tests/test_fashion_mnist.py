"""Fashion-MNIST offline: Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist``, installed by .ci/run where apt-get exists) puts the idx files in
/usr/share/datasets/fashion-mnist. The tests read a few hundred images and skip without the folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sdediff.data as D
from sdediff.cli._common import config_dir

ROOT = Path(D.FASHION_MNIST_ROOT)
needs_data = pytest.mark.skipif(
    not (ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {ROOT} (apt-get install dataset-fashion-mnist)",
)


def test_missing_folder_is_one_line_naming_the_package_and_root(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        D.fashion_mnist(tmp_path / "nowhere", "test")
    msg = str(e.value)
    assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg and "data.root=" in msg


@needs_data
def test_default_root_reads_the_debian_files():
    ds = D.fashion_mnist(split="test")
    assert len(ds) == 10_000 and ds.item_shape == (1, 28, 28) and ds.is_uint8
    assert ds.classes == list(D.FASHION_MNIST_CLASSES) and len(ds.classes) == 10
    y = ds.labels[:500]
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(ds.labels, minlength=10).tolist() == [1000] * 10  # the test split is balanced
    x = ds.tensor()[:300]
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0


@needs_data
def test_experiment_config_builds_for_the_data():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=fashion_mnist"])
    assert cfg.eval.quality and cfg.data.root == str(ROOT)
    test = instantiate(cfg.eval.test_data)
    x = test.tensor()[:4]
    net = instantiate(cfg.model.net, schedule=None)
    assert sum(p.numel() for p in net.parameters()) == 6_469_889  # the size the experiment's comment states
    with torch.no_grad():
        assert net(x, torch.full((4,), 0.5)).shape == x.shape
