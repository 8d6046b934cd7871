"""sedit.flat_engine in one process: accumulation, clipping off, checkpoints, and the configs it refuses."""

import json

import pytest
import torch

from sedit.config import ConfigError, build_config
from sedit.engine import TopologyError, load_ds_config, resolve_ds_config
from sedit.flat_engine import FlatEngine, weight_decay_groups


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def flat_config(accumulation: int = 2, clip: float = 0.0, weight_decay: float = 0.1) -> dict:
    return {
        "engine": "flat",
        "bf16": {"enabled": False},
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 0.05, "betas": [0.8, 0.99], "eps": 1e-8, "weight_decay": weight_decay},
        },
    }


def micro_step(engine, x: torch.Tensor) -> None:
    engine.backward(engine(x).square().sum() * 1e3)  # large gradients: a clip would show
    engine.step()


def test_accumulates_micro_batches_and_steps_once_without_clipping():
    engine = FlatEngine(mlp(0), flat_config(), torch.device("cpu"))
    twin = mlp(0)
    reference = torch.optim.AdamW(weight_decay_groups(twin, 0.1), lr=0.05, betas=(0.8, 0.99), eps=1e-8)
    x = torch.randn(2, 4, 6)
    before = [p.detach().clone() for p in engine.module.parameters()]
    micro_step(engine, x[0])
    assert all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters(), strict=True))  # not yet
    micro_step(engine, x[1])
    (sum(twin(part).square().sum() * 1e3 for part in x) / 2).backward()  # the mean over micro-batches
    reference.step()
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in twin.parameters()]))
    torch.testing.assert_close(engine.get_global_grad_norm(), norm)
    assert norm > 1  # clipping at 0 means no clipping, not a zero step
    for p, q in zip(engine.module.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert not engine.grads.buffer.any()


def test_checkpoint_restores_the_state_and_keeps_this_runs_hyperparameters(tmp_path):
    engine = FlatEngine(mlp(0), flat_config(), torch.device("cpu"))
    x = torch.randn(3, 4, 6)
    micro_step(engine, x[0])
    micro_step(engine, x[1])
    engine.save_checkpoint(str(tmp_path), "step_1", client_state={"step": 1})
    resumed = FlatEngine(mlp(1), flat_config(), torch.device("cpu"))  # other weights until loaded
    path, client = resumed.load_checkpoint(str(tmp_path), "step_1")
    assert path == str(tmp_path / "step_1") and client == {"step": 1}
    for run in (engine, resumed):
        micro_step(run, x[2])
        micro_step(run, x[0])
    for a, b in zip(engine.module.parameters(), resumed.module.parameters(), strict=True):
        assert torch.equal(a, b)  # weights, moments and step counts came back whole

    changed = FlatEngine(mlp(1), flat_config(weight_decay=0.2), torch.device("cpu"))
    changed.load_checkpoint(str(tmp_path), "step_1")
    assert [g["weight_decay"] for g in changed.optimizer.param_groups] == [0.2, 0.0]  # this run's config
    first = next(changed.module.parameters())
    assert changed.optimizer.state[first]["step"].item() == 1  # the checkpoint's moments and step count
    assert changed.load_checkpoint(str(tmp_path), "step_9") == (None, {})


@pytest.mark.parametrize(
    "change, field",
    [
        ({"zero_optimization": {"stage": 2}}, "zero_optimization"),
        ({"fp16": {"enabled": True}}, "fp16"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
        ({"optimizer": {"type": "Lamb", "params": {}}}, "optimizer.type"),
        ({"engine": "flatt"}, "engine"),
    ],
)
def test_settings_it_would_ignore_are_refused_naming_file_and_field(tmp_path, change, field):
    path = tmp_path / "flat.json"
    path.write_text(json.dumps({**flat_config(), **change}))
    with pytest.raises(ConfigError, match=rf"flat.json: {field}:"):
        load_ds_config(path)


def test_expert_parallelism_is_refused():
    cfg = build_config({"preset": "tiny", "stage": {"micro_batch": 2, "global_batch": 4}})
    resolve_ds_config(flat_config(), cfg, world_size=2, ep_size=1)
    with pytest.raises(TopologyError, match="flat engine keeps every expert on every rank"):
        resolve_ds_config(flat_config(), cfg, world_size=2, ep_size=2)
