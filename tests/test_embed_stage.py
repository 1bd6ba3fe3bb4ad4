"""Embeddings of images and neurons: stored per layer and method, reproducible, exportable."""
import numpy as np
import pytest

import zoo
from pipeline import load_run
from pipeline.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed")
    zoo.image_folder(tmp / "images", per_class=20, size=16)
    zoo.write_config(tmp, zoo.save(zoo.sequential(), tmp / "m", "keras"), tmp / "images",
                     embed={"methods": ["tsne", "umap"]})
    assert main(["run", str(tmp / "c.yaml"), "--only", "extract"]) == 0
    assert main(["run", str(tmp / "c.yaml"), "--only", "embed"]) == 0
    return tmp


def test_every_layer_and_method_is_embedded_with_quality(run_dir):
    run = load_run(run_dir / "run")
    images, neurons, quality = run.image_embeddings, run.neuron_embeddings, run.embedding_quality
    for layer in run.layer_names:
        for method in ("tsne", "umap"):
            rows = images.query("layer == @layer and method == @method")
            assert sorted(rows["index"]) == list(range(60))
            assert np.isfinite(rows[["x", "y"]].to_numpy()).all()
    conv_b = neurons.query("layer == 'conv_b' and method == 'tsne'")
    assert sorted(conv_b.channel) == [c for c in range(6) if not run.activations("conv_b")[:, c].std() == 0]
    q = quality.set_index(["layer", "of", "method"])
    # Classes differ in brightness, which every layer sees: the map keeps them apart.
    assert q.loc[("conv_a", "images", "tsne"), "knn_accuracy"] > 0.8
    assert q.loc[("conv_a", "images", "tsne"), "trustworthiness"] > 0.8


def test_same_config_twice_gives_identical_embeddings(run_dir):
    first = load_run(run_dir / "run").image_embeddings.copy()
    first_n = load_run(run_dir / "run").neuron_embeddings.copy()
    assert main(["run", str(run_dir / "c.yaml"), "--only", "embed", "--force"]) == 0
    again = load_run(run_dir / "run")
    assert first.equals(again.image_embeddings)
    assert first_n.equals(again.neuron_embeddings)


def test_projector_export_writes_vectors_metadata_and_sprite(run_dir, capsys):
    assert main(["export", "projector", str(run_dir / "run"), "--layer", "conv_b"]) == 0
    folder = run_dir / "run" / "projector" / "conv_b"
    vectors = np.loadtxt(folder / "tensors.tsv", delimiter="\t")
    np.testing.assert_allclose(vectors, load_run(run_dir / "run").activations("conv_b")[:], rtol=1e-5, atol=1e-6)
    meta = (folder / "metadata.tsv").read_text().splitlines()
    assert meta[0] == "index\tclass\tfile" and len(meta) == 61 and meta[1].split("\t")[1] == "a"
    config = (folder / "projector_config.pbtxt").read_text()
    assert 'tensor_path: "tensors.tsv"' in config and "single_image_dim: 16" in config
    from PIL import Image

    assert Image.open(folder / "sprite.png").size == (8 * 16, 8 * 16)  # ceil(sqrt(60)) = 8 per row


def test_export_of_an_unknown_layer_is_a_clear_error(run_dir, capsys):
    assert main(["export", "projector", str(run_dir / "run"), "--layer", "nope"]) == 2
    assert "layer 'nope' was not extracted" in capsys.readouterr().err
