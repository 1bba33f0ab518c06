"""Fine-tuning from another run: weights copied where they fit, adapted where only input channels differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autoseg.cli import main
from autoseg.data.synth import make_dataset
from autoseg.errors import ConfigError
from autoseg.fingerprint import extract_fingerprint
from autoseg.networks.builder import build_network
from autoseg.planning.planner import make_plans
from autoseg.planning.plans import load_plans
from autoseg.runfolder import RunFolder, record_dataset
from autoseg.training import pretrain as pretrain_module
from autoseg.training.checkpoint import load_checkpoint
from autoseg.training.pretrain import PretrainOptions, masked_input, masked_mse, pretrain
from autoseg.training.schedule import learning_rate
from autoseg.training.transfer import initialise_from, resolve_source, transfer_weights

TINY = ["training.epochs=1", "training.iterations_per_epoch=2", "training.val_iterations=1"]


def _spec():
    from autoseg.networks.spec import NetworkSpec

    return NetworkSpec(2, (4, 8), ((3, 3, 3), (3, 3, 3)), ((1, 1, 1), (2, 2, 2)), (1, 1), (1,), deep_supervision=True)


def test_mismatched_channels_are_adapted_and_new_heads_reinitialised():
    torch.manual_seed(0)
    source = build_network(_spec(), 1, 3)
    target = build_network(_spec(), 2, 4)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = transfer_weights(target, source.state_dict(), "source")
    state, theirs = target.state_dict(), source.state_dict()
    first = next(n for n in report.adapted)
    assert report.adapted == [first] and theirs[first].shape[1] == 1 and state[first].shape[1] == 2
    torch.testing.assert_close(state[first][:, :1], theirs[first] / 2)  # scaled by 1 / 2 channels
    torch.testing.assert_close(state[first][:, 1:], theirs[first] / 2)
    assert report.reinitialised and all("heads" in n for n in report.reinitialised)
    for name in report.reinitialised:
        torch.testing.assert_close(state[name], fresh[name])  # kept their fresh initialisation
    for name in report.copied:
        torch.testing.assert_close(state[name], theirs[name])
    assert len(report.copied) + len(report.adapted) + len(report.reinitialised) == len(state)



@pytest.mark.parametrize("same_labels", [True, False])
def test_heads_are_copied_only_when_the_source_segmented_the_same_labels(tmp_path, same_labels):
    torch.manual_seed(0)
    labels = {"background": 0, "anterior": 1, "posterior": 2}
    theirs = labels if same_labels else {"background": 0, "gland": 1, "lesion": 2}
    checkpoint = tmp_path / "source" / "models" / "3d_fullres" / "fold_all" / "checkpoint_final.pt"
    checkpoint.parent.mkdir(parents=True)
    (tmp_path / "source" / "plans.json").write_text(json.dumps({"labels": theirs}))
    source = build_network(_spec(), 1, 3)
    torch.save({"network": source.state_dict()}, checkpoint)
    target = build_network(_spec(), 1, 3)
    report = initialise_from(target, str(checkpoint), "3d_fullres", labels)
    heads = [n for n in target.state_dict() if n.startswith("heads.")]
    assert heads and set(heads) <= set(report.copied if same_labels else report.reinitialised)
    assert not [n for n in report.reinitialised if not n.startswith("heads.")]


def test_warm_up_rises_to_the_schedule():
    plans = make_plans(_tiny_fingerprint(), device="cpu", check_speed=False, cpu_flops=5e7)
    c = plans.configurations["3d_fullres"]
    import dataclasses

    warm = dataclasses.replace(c, training=dataclasses.replace(c.training, warmup_epochs=3))
    rates = [learning_rate(warm, e) for e in range(5)]
    assert rates[0] < rates[1] < rates[2] < rates[3]
    assert rates[3] == learning_rate(c, 3) and rates[4] == learning_rate(c, 4)


def _tiny_fingerprint():
    from autoseg.fingerprint_import import load_corpus_entry

    corpus = Path(__file__).resolve().parents[2] / "fingerprints"
    fp = load_corpus_entry(corpus / "Dataset004_Hippocampus.json").fingerprint
    assert fp is not None
    return fp


def test_fine_tune_a_run_planned_like_another_dataset(tmp_path):
    source_data = make_dataset(tmp_path / "ct", "ct3d", cases=3, test_cases=0, seed=1)
    target_data = make_dataset(tmp_path / "mr", "mr3d", cases=3, test_cases=0, seed=2)
    source, target = tmp_path / "source", tmp_path / "target"
    prints = {}
    for data, run in ((source_data, source), (target_data, target)):
        record_dataset(run, data)
        prints[run] = extract_fingerprint(data, run / "fingerprint.json", workers=1)
    tiny = dict(device="cpu", check_speed=False, cpu_flops=5e7, overrides=TINY)
    make_plans(prints[source], **tiny).save(source / "plans.json")
    assert main(["preprocess", str(source), "-c", "3d_fullres", "-j", "1"]) == 0
    assert main(["train", str(source), "-c", "3d_fullres", "-f", "all", "--device", "cpu", "-j", "0"]) == 0
    # the MR dataset (2 channels, 2 classes) planned like the CT run (1 channel, 3 classes), then fine-tuned
    theirs = load_plans(source)
    make_plans(prints[target], **tiny, like=theirs).save(target / "plans.json")
    plans = load_plans(target)
    assert plans.configurations["3d_fullres"].network == theirs.configurations["3d_fullres"].network
    assert plans.channels != theirs.channels and plans.n_outputs != theirs.n_outputs
    assert main(["preprocess", str(target), "-c", "3d_fullres", "-j", "1"]) == 0
    args = ["train", str(target), "-c", "3d_fullres", "-f", "all", "--device", "cpu", "-j", "0"]
    assert main([*args, "--init-from", f"{source}:3d_fullres"]) == 0
    report = json.loads((RunFolder(target).fold("3d_fullres", "all") / "transfer.json").read_text())
    assert report["copied"] and len(report["adapted"]) == 1 and report["reinitialised"]
    state = load_checkpoint(RunFolder(target).checkpoint("3d_fullres", "all"))
    assert json.loads(state["configuration"])["training"]["init_from"] == f"{source}:3d_fullres"
    with pytest.raises(ConfigError, match="not found"):
        resolve_source(f"{source}:2d", "2d")
    with pytest.raises(ConfigError, match="no trained fold"):
        resolve_source(str(tmp_path / "nothing"), "2d")


def test_masked_input_hides_whole_blocks():
    data = torch.randn(2, 1, 10, 20, 30) + 5
    masked, hidden = masked_input(data, (2, 4, 4), 0.6, torch.Generator().manual_seed(0))
    assert hidden.shape == (2, 1, 10, 20, 30) and 0.45 < float(hidden.mean()) < 0.75
    assert torch.all(masked[hidden.bool().expand_as(masked)] == 0)
    torch.testing.assert_close(masked[~hidden.bool().expand_as(masked)], data[~hidden.bool().expand_as(data)])
    blocks = hidden[:, 0].reshape(2, 5, 2, 5, 4, 30)  # constant inside each 2 x 4 x 4 block
    assert torch.all(blocks.amax((2, 4)) == blocks.amin((2, 4)))


def test_masked_mse_is_the_mean_squared_error_on_the_hidden_voxels_of_each_sample():
    image = torch.tensor([[[1.0, 2.0, 3.0]], [[-4.0, 5.0, -6.0]]])  # batch 2, one channel, 3 voxels
    hidden = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]])
    output = torch.tensor([[[0.0, 0.0, 0.0]], [[0.0, 3.0, 0.0]]])
    # hidden errors: 1 and 3 (sample 0), 2 (sample 1): (1 + 9 + 4) / 3
    loss = masked_mse(output, torch.cat([image, hidden], 1))
    assert float(loss) == pytest.approx(14 / 3)
    assert float(masked_mse(image, torch.cat([image, hidden], 1))) == 0.0


def test_pretrain_resumes_exactly_and_fine_tunes_into_a_segmentation_run(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", "ct3d", cases=3, test_cases=0, seed=3)
    run = tmp_path / "run"
    record_dataset(run, data)
    fp = extract_fingerprint(data, run / "fingerprint.json", workers=1)
    make_plans(fp, device="cpu", check_speed=False, cpu_flops=5e7, overrides=TINY).save(run / "plans.json")
    options = PretrainOptions(epochs=2, device="cpu")
    whole = pretrain([data], tmp_path / "whole", run, config="3d_fullres", options=options)
    calls = {"n": 0}
    real = pretrain_module._epoch

    def dies_in_the_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "_epoch", dies_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        pretrain([data], tmp_path / "resumed", run, config="3d_fullres", options=options)
    monkeypatch.setattr(pretrain_module, "_epoch", real)
    resumed = pretrain([data], tmp_path / "resumed", run, config="3d_fullres", options=options)
    a, b = load_checkpoint(whole)["network"], load_checkpoint(resumed)["network"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed.parent / "training_curve.png").is_file()
    losses = [json.loads(line)["train_loss"] for line in (resumed.parent / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 <= x < 10 for x in losses)  # a squared error of z-scored intensities
    # the pretrained encoder and decoder start a segmentation run; the reconstruction head does not
    assert main(["preprocess", str(run), "-c", "3d_fullres", "-j", "1"]) == 0
    args = ["train", str(run), "-c", "3d_fullres", "-f", "all", "--device", "cpu", "-j", "0"]
    assert main([*args, "--init-from", str(tmp_path / "whole")]) == 0
    report = json.loads((RunFolder(run).fold("3d_fullres", "all") / "transfer.json").read_text())
    assert report["reinitialised"] and all(n.startswith("heads.") for n in report["reinitialised"])
    assert len(report["copied"]) + len(report["adapted"]) > 10
