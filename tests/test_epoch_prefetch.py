"""No stall at epoch boundaries (issue 25): the next epoch's training batches start loading before this
epoch's validation, on both data paths. The loader workers ask the sampler for an epoch's indices when
the epoch's pass starts (the main process deals them), so the order of the sampler's passes and the
validations tells when loading began; a worker-side log shows the next epoch's images being decoded
while validation runs."""

import pytest

from test_train import tiny_config
from vgg.data.batches import loaders as vloaders
from vgg.data.datasets import folders as vfolders
from vgg.training import epochs as vepochs
from vgg.training import run as vrun


@pytest.mark.parametrize("data_path", ["cpu", "gpu"])  # the GPU path runs on the CPU here (TorchCodec)
def test_the_next_epoch_starts_loading_before_validation(sample_root, tmp_path, monkeypatch, data_path):
    events = []
    real_iter, real_validate = vloaders.EpochSampler.__iter__, vepochs.validate

    def recording_iter(sampler):
        events.append(("train pass", sampler.epoch))
        return real_iter(sampler)

    def recording_validate(*args, **kwargs):
        events.append(("validate",))
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(vloaders.EpochSampler, "__iter__", recording_iter)
    monkeypatch.setattr(vepochs, "validate", recording_validate)
    config = tiny_config(sample_root, tmp_path, epochs=3, steps_per_epoch=2, workers=1, stats="imagenet",
                         data_path=data_path)
    vrun.run(config)
    # The first pass is TensorBoard's grid of augmented images (epoch 0's first batch), then one an epoch.
    passes = [e for e in events if e[0] == "train pass"]
    assert passes == [("train pass", 0), ("train pass", 0), ("train pass", 1), ("train pass", 2)]
    # Epoch e + 1's pass begins before epoch e's validation; none after the last epoch.
    assert [e[0] for e in events] == ["train pass"] * 3 + ["validate", "train pass", "validate", "validate"]


def test_the_next_epoch_is_decoded_while_validation_runs(sample_root, tmp_path, monkeypatch):
    """Worker-side: during epoch 0's validation the (persistent) training worker decodes epoch 1's images."""
    decoded = tmp_path / "decoded.txt"
    real_getitems = vfolders.ImageFolder.__getitems__

    def logging_getitems(dataset, indices):
        if dataset.transform is not None and isinstance(indices[0], tuple):  # training: (epoch, index)
            with open(decoded, "a") as f:
                f.write("".join(f"{epoch}\n" for epoch, _ in indices))
        return real_getitems(dataset, indices)

    seen_at_validation = []
    real_validate = vepochs.validate

    def checking_validate(*args, **kwargs):
        import time

        deadline = time.monotonic() + 60  # the worker needs a moment; without the early start it never comes
        while time.monotonic() < deadline and "1" not in decoded.read_text().split():
            time.sleep(0.05)
        seen_at_validation.append(sorted(set(decoded.read_text().split())))
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(vfolders.ImageFolder, "__getitems__", logging_getitems)  # (workers are forked: inherited)
    monkeypatch.setattr(vepochs, "validate", checking_validate)
    vrun.run(tiny_config(sample_root, tmp_path, epochs=2, steps_per_epoch=2, workers=1, stats="imagenet"))
    assert seen_at_validation[0] == ["0", "1"]  # epoch 1's batches were decoded before epoch 0's validation ended
