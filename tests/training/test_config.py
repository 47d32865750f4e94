"""Config loading: every shipped config validates; overrides are typed; bad keys are named."""

from pathlib import Path

import pytest

from fdpg_scale.training.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads_and_its_deepspeed_json_exists(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert (ROOT / cfg.deepspeed.config).is_file(), f"{path.name}: missing {cfg.deepspeed.config}"


def test_overrides_are_parsed_with_the_field_type():
    cfg = load_config(ROOT / "configs/smoke.yaml",
                      ["train.steps=20", "train.lr=1e-4", "divergence.name=alpha", "divergence.alpha=0.5",
                       "train.on_policy=true", "target.scorer_args.substring=def", "seed=3"])
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.divergence.alpha == 0.5 and cfg.train.on_policy is True and cfg.seed == 3
    assert cfg.target.scorer_args == {"substring": "def"}


@pytest.mark.parametrize("override, needle", [
    ("train.stepz=3", "'train.stepz'"),
    ("trainn.steps=3", "'trainn.steps'"),
    ("train.steps=many", "'train.steps' must be of type int"),
    ("train.steps=2.5", "'train.steps' must be of type int"),
    ("train.on_policy=3", "'train.on_policy' must be of type bool"),
    ("divergence.name=kld", "one of kl, rkl"),
    ("divergence.name=alpha", "'kl'"),
    ("divergence.alpha=0.5", "takes no alpha"),
    ("model.path.deeper=1", "'model.path.deeper'"),
    ("train.steps", "key=value"),
    ("sampling.top_p=0", "sampling.top_p"),
])
def test_bad_override_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(ROOT / "configs/smoke.yaml", [override])
    assert needle in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_file_is_rejected_by_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x}\ntrain: {stepss: 3}\n")
    with pytest.raises(ConfigError, match="'train.stepss'"):
        load_config(bad)


def test_missing_model_path_and_missing_file():
    with pytest.raises(ConfigError, match="model.path"):
        load_config(ROOT / "configs/smoke.yaml", ["model.path="])  # None is not a str
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ROOT / "configs/nope.yaml")


def test_global_batch_must_split_over_micro_batches_and_ranks():
    cfg = load_config(ROOT / "configs/smoke.yaml", ["train.global_batch=8", "train.micro_batch=2"])
    assert cfg.train.accumulation_steps(1) == 4 and cfg.train.accumulation_steps(2) == 2
    with pytest.raises(ConfigError, match="train.global_batch=8 is not a multiple"):
        cfg.train.accumulation_steps(3)


def test_sampling_batch_is_a_multiple_of_the_micro_batch_that_splits_the_rank_share():
    cfg = load_config(ROOT / "configs/smoke.yaml", ["train.micro_batch=2", "sampling.batch=4"])
    assert cfg.sampling_batch(1) == cfg.sampling_batch(2) == 4  # 8 or 4 sequences per rank, 2 or 1 calls
    with pytest.raises(ConfigError, match="sampling.batch=4 does not divide the 2 sequences each of the 4 ranks"):
        cfg.sampling_batch(4)
    with pytest.raises(ConfigError, match="sampling.batch=3 must be a multiple of train.micro_batch=2"):
        load_config(ROOT / "configs/smoke.yaml", ["train.micro_batch=2", "sampling.batch=3"])
    assert load_config(ROOT / "configs/smoke.yaml").sampling_batch(2) == 4  # default: the micro-batch


def test_sampling_engine_and_its_vllm_section():
    """sampling.engine picks hf (default) or vllm; the nested sampling.vllm.* keys are typed and checked."""
    smoke = ROOT / "configs" / "smoke.yaml"
    assert load_config(smoke).sampling.engine == "hf"
    cfg = load_config(smoke, ["sampling.engine=vllm", "sampling.vllm.kv_cache_mib=null",
                              "sampling.vllm.gpu_memory_utilization=0.5", "sampling.vllm.enforce_eager=false"])
    v = cfg.sampling.vllm
    assert cfg.sampling.engine == "vllm" and v.kv_cache_mib is None and v.gpu_memory_utilization == 0.5
    assert v.enforce_eager is False
    for bad, needle in (("sampling.engine=vllmx", "sampling.engine"), ("sampling.vllm.kv_cache_mib=0", "kv_cache_mib"),
                        ("sampling.vllm.gpu_memory_utilization=1.5", "gpu_memory_utilization"),
                        ("sampling.vllm.max_model_len=1", "max_model_len"), ("sampling.vllm.foo=1", "foo")):
        with pytest.raises(ConfigError, match=needle):
            load_config(smoke, [bad])


def test_config_round_trips_through_a_plain_mapping(tmp_path):
    """config_to_dict is what a run writes beside its checkpoints; written as YAML it loads to an equal config."""
    import yaml

    from fdpg_scale.training.config import config_to_dict

    cfg = load_config(ROOT / "configs/smoke-several-scorers.yaml", ["sampling.temperature=0.7", "train.lr=3e-4"])
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(path) == cfg


def test_sampling_section_derives_the_samplers_settings():
    """The fields that define q are the sampler's own (distributed/settings.py): declared once, checked once."""
    from fdpg_scale.distributed.settings import SamplingSettings, VllmEngineOptions

    cfg = load_config(ROOT / "configs/smoke.yaml", ["sampling.top_k=5", "sampling.vllm.max_model_len=64"])
    assert isinstance(cfg.sampling, SamplingSettings) and isinstance(cfg.sampling.vllm, VllmEngineOptions)
    settings = cfg.sampling.sampling_settings()
    assert type(settings) is SamplingSettings and settings.top_k == 5
    assert settings.max_new_tokens == cfg.sampling.max_new_tokens and settings.top_p == cfg.sampling.top_p
    assert cfg.sampling.vllm.engine_options() == {"gpu_memory_utilization": 0.3, "max_model_len": 64,
                                                  "enforce_eager": True}
    with pytest.raises(ConfigError, match=r"^sampling\.temperature must be a finite number > 0, got inf$"):
        load_config(ROOT / "configs/smoke.yaml", ["sampling.temperature=inf"])
