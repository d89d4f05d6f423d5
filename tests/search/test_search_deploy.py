"""deploy.pt is the network that was scored: a plain module from hasb.export.load_deployment reproduces the
accuracy config.json reports, image for image, on a real (short) training run on real Fashion-MNIST."""

import json

import pytest
import torch

from hasb.data import load_dataset
from hasb.export import DeployedConv2d, DeployedLinear, load_deployment
from hasb.modules import QUANT_TYPES, SwitchBatchNorm
from hasb.train import TrainConfig, train
from search.evaluate import score
from search.pareto import main
from tests.conftest import have_fmnist
from tests.support.fakes import fake_sensitivity

pytestmark = pytest.mark.skipif(not have_fmnist(), reason="needs Fashion-MNIST (see README setup)")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A multi-precision small_cnn trained for one short epoch on 512 real images, with a contract sensitivity."""
    d = tmp_path_factory.mktemp("real")
    cfg = TrainConfig(
        stage="multi",
        model="small_cnn",
        out=str(d / "multi"),
        epochs=1,
        batch_size=64,
        lr=3e-3,
        train_limit=512,
        val_limit=128,
        warmup_epochs=0,
        device="cpu",
        progress=False,
    )
    train(cfg)
    from hasb.export import load_quantized

    model, _ = load_quantized(d / "multi" / "model.pt")
    (d / "multi" / "sensitivity.json").write_text(json.dumps(fake_sensitivity(model)))
    return d / "multi" / "model.pt"


def test_deployment_reproduces_config_accuracy_exactly(trained_run, tmp_path):
    out = tmp_path / "search"
    assert (
        main(
            [
                "--budget",
                "4",
                "--checkpoint",
                str(trained_run),
                "--out",
                str(out),
                "--no-optuna",
                "--val-limit",
                "300",
                "--test-limit",
                "400",
                "--calib-size",
                "256",
                "--sweep",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    doc = json.loads((out / "budget-4" / "config.json").read_text())
    deployed = load_deployment(out / "budget-4" / "deploy.pt")
    # a plain torch module: no hasb switching layers left, every quantized layer replaced
    kinds = {type(m) for m in deployed.modules()}
    assert not kinds & {*QUANT_TYPES, SwitchBatchNorm} and kinds & {DeployedConv2d, DeployedLinear}
    splits = load_dataset("fashion-mnist", val_limit=300)
    val, test = doc["scores"]["validation"], doc["scores"]["test"]
    assert (val["split"], val["n"], val["selected_on"]) == ("validation", 300, True)
    assert (test["split"], test["n"], test["selected_on"]) == ("test", 400, False)
    assert doc["scores"]["bn"] == {"mode": "recal", "calibration_images": 256}
    for sc, data in ((val, splits.val), (test, (splits.test[0][:400], splits.test[1][:400]))):
        r = score(deployed, data)
        correct, n = r.correct, r.n
        assert (r.metric, n) == ("accuracy", sc["n"]) and sc["metric"] == "accuracy"
        assert correct == sc["correct"]  # the same images classified correctly
        p = correct / n
        assert sc["se"] == pytest.approx((p * (1 - p) / n) ** 0.5)
    assert doc["metrics"]["accuracy"] == val["accuracy"]
    # model.onnx beside it is the same network: onnxruntime agrees with the deployed module's predictions
    # (QuantizeLinear rounds x/s, torch's fake-quant x·(1/s): an input on a rounding tie may move one step; the
    # ONNX tests measured ≤ 0.13% of inputs affected, so ≥ 99% identical predictions is a bound with headroom)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(out / "budget-4" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = splits.val[0]
    logits = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = deployed(x).argmax(1).numpy()
    assert (logits.argmax(1) == ref).mean() >= 0.99
    assert doc["tool_notes"]["onnx"].startswith("model.onnx")
