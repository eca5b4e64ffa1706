import numpy as np
import pytest

from gradcon_core.data.idx import load_mnist
from gradcon_core.data.imageset import recorded_dataset
from gradcon_core.results.evaluation import RunResult, saved_runs, write_outputs
from gradcon_core.results.papers import PUBLISHED, Comparison, our_method, paired_test, published_rows, reference_row
from jobs.prepare import prepare
from tests.conftest import MNIST_DIR, write_idx

FASHION_DIR = MNIST_DIR.parent / "fashion-mnist"


@pytest.mark.parametrize("protocol, dataset", sorted(PUBLISHED))
def test_every_published_table_reads_as_auroc_fractions(protocol, dataset):
    rows = published_rows(protocol, dataset)
    assert rows
    for r in rows:
        assert 0 < r.mean <= 1, r
        if r.per_class:
            assert sorted(r.per_class) == list(range(10)) and all(0 < v <= 1 for v in r.per_class.values())
            # the printed mean is the mean of the printed classes (to the papers' rounding)
            assert np.mean(list(r.per_class.values())) == pytest.approx(r.mean, abs=0.0021), r.label


def test_rows_as_printed_and_the_reference_for_each_method():
    gradcon = published_rows("gradcon", "mnist")
    assert [r.method for r in gradcon][-1] == "GradCon" and gradcon[-1].per_class[8] == 0.919
    arae = published_rows("full", "fashion-mnist")
    (row,) = [r for r in arae if r.method == "ARAE" and r.per_class]
    assert row.per_class[6] == pytest.approx(0.836) and row.paper == "Salehi et al. 2020 (ARAE)"  # percent in the file
    assert [r.mean for r in arae if r.method.startswith("Puzzle-AE")] == pytest.approx([0.9226, 0.93])
    assert reference_row(gradcon, "VAE", "gradcon").method == "VAE"
    assert reference_row(gradcon, "WAE", "gradcon").method == "GradCon"  # not published: the protocol's own
    assert reference_row(arae, "GradCon", "full").method == "ARAE"
    ablation = published_rows("gradcon", "cifar10")
    assert reference_row(ablation, "CAE", "gradcon").method == "CAE (recon score)"
    assert reference_row(published_rows("gradcon", "fashion-mnist"), "GradCon", "gradcon") is None  # a mean only
    assert published_rows("labeled", "defects") == [] and published_rows("gradcon", "photos") == []
    assert our_method("gradcon", {"epsilon": 0.05, "alpha": 0.0, "beta": 0.0}) == "ARAE"
    assert our_method("gradcon", {"epsilon": 0.05}) == "GradCon" and our_method("deep_svdd", {}) == "DSVDD"


def test_paired_test_over_classes():
    ours = {c: 0.9 + 0.01 * c for c in range(10)}
    better = paired_test(ours, {c: v - 0.02 - 0.001 * c for c, v in ours.items()})
    assert better.classes == 10 and better.p_value < 0.01  # ours higher in every class
    mixed = paired_test(ours, {c: v + (0.01 if c % 2 else -0.01) for c, v in ours.items()})
    assert mixed.p_value > 0.5
    assert paired_test({0: 0.9}, {0: 0.8}).p_value is None  # one class says nothing
    assert "needs 2+ classes" in paired_test({0: 0.9}, {0: 0.8}).sentence("a", "b")


def _runs(classes, seeds=(0, 1)):
    rng = np.random.default_rng(0)
    runs = []
    for c in classes:
        for s in seeds:
            labels = np.r_[np.zeros(20, bool), np.ones(20, bool)]
            scores = rng.normal(size=40) + labels * (1 + c)
            runs.append(RunResult({"class": c, "seed": s, "auroc": 0.9 + 0.005 * c + 0.001 * s, "aupr": 0.9,
                                   "f1": 0.8, "fpr95": 0.1}, scores, labels, {}))
    return runs


def test_a_saved_run_loads_as_it_was_and_is_listed(tmp_path):
    for run in _runs([3, 7], seeds=(0,)):
        run.save(tmp_path)
    (tmp_path / "class-5-seed-0.npz").write_bytes(b"")  # a run stopped before its .json: not finished
    assert saved_runs(tmp_path) == [(3, 0), (7, 0)]
    loaded = RunResult.load(tmp_path, 7, 0)
    assert loaded.metrics["auroc"] == _runs([3, 7], seeds=(0,))[1].metrics["auroc"]
    np.testing.assert_array_equal(loaded.scores, _runs([3, 7], seeds=(0,))[1].scores)
    assert RunResult.load(tmp_path, 5, 0) is None


def test_outputs_beside_the_papers_only_for_their_datasets(tmp_path):
    (tmp_path / "mnist").mkdir()
    md = write_outputs(tmp_path / "mnist", _runs(range(10)), title="GradCon on mnist", method="GradCon",
                       protocol="gradcon", dataset="mnist")
    assert (tmp_path / "mnist" / "auroc_by_class.png").stat().st_size > 0
    assert "| GradCon (Kwon et al. 2020) | 0.9950 |" in md and "Only" not in md  # all classes: means compare
    assert "| **ours: GradCon** | 0.9005 ± 0.0005 |" in md and "| ours − GradCon | -0.0945 |" in md
    assert "Paired Wilcoxon signed-rank test over 10 classes" in md

    (tmp_path / "textures").mkdir()
    md = write_outputs(tmp_path / "textures", _runs([0, 1]), title="GradCon on textures", method="GradCon",
                       protocol="labeled", dataset="textures")
    assert "published" not in md and "Kwon" not in md
    assert not (tmp_path / "textures" / "auroc_by_class.png").exists()

    comparison = Comparison("CAE", "labeled", "textures", {0: 0.9, 1: 0.8}, {0: 0.0, 1: 0.0}, [],
                            other=("gradcon-run", {0: 0.95, 1: 0.7}))
    assert "| gradcon-run | 0.9500 | 0.7000 | 0.8250 |" in comparison.markdown()


def test_prepare_records_the_known_dataset_only(small_mnist_idx, tmp_path):
    prepare("mnist", str(small_mnist_idx), str(tmp_path / "digits"))
    assert recorded_dataset(str(tmp_path / "digits")) == "mnist"
    folder = tmp_path / "photos"
    (folder / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "a" / "x.png")
    prepare("folder", str(folder), str(tmp_path / "photos-set"))
    assert recorded_dataset(str(tmp_path / "photos-set")) is None


@pytest.mark.skipif(not (FASHION_DIR / ".complete").exists(),
                    reason=f"Fashion-MNIST is not in {FASHION_DIR}: `make data` fetches it from Debian's archive")
def test_fashion_mnist_from_make_data_is_prepared_and_compared(tmp_path):
    (tmp_path / "idx").mkdir()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = load_mnist(FASHION_DIR, split)
        assert x.shape[1:] == (28, 28) and sorted(np.unique(y)) == list(range(10))
        write_idx(tmp_path / "idx" / f"{prefix}-images-idx3-ubyte", x[:100])
        write_idx(tmp_path / "idx" / f"{prefix}-labels-idx1-ubyte", y[:100])
    prepare("fashion-mnist", str(tmp_path / "idx"), str(tmp_path / "set"))
    assert recorded_dataset(str(tmp_path / "set")) == "fashion-mnist"
    (row,) = published_rows("gradcon", "fashion-mnist")
    assert row.mean == pytest.approx(0.934) and not row.per_class
