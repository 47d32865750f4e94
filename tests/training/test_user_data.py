"""A user's own model and data, as they arrive: tokenizers without BOS (Qwen-style), prompt datasets with
metadata columns, chat templates and Hub ids read from the local cache.

Every model here is the tiny GPT-2 built on the spot, edited as a user's would differ (no BOS token, a chat
template); every command runs as a user would start it (``fdpg-scale ...`` through ``fdpg_scale.cli``). Bad
inputs are a table of one-line errors, as in tests/test_bad_inputs.py: ``train`` runs its pre-start checks
(``training/preflight.py``) in-process instead of starting the engines.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fdpg_scale import cli
from fdpg_scale.errors import EXIT_BAD_INPUT
from fdpg_scale.models.tiny import build_tiny_model_dir
from fdpg_scale.models.tokens import padding_id, special_token_problem, start_id
from fdpg_scale.training import loop
from fdpg_scale.training.preflight import preflight
from tests.harness import fill_paths, one_line, run_cli, side_by_side

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


def strip_special_tokens(model_dir: Path, *names: str) -> None:
    """Remove every mention of the special tokens ``names`` ("bos", "eos", "pad") from a HF directory's tokenizer
    and model config files (the tokens stay in the vocabulary, unnamed, as Qwen's has no BOS)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            for token in names:
                data.pop(f"{token}_token", None)
            path.write_text(json.dumps(data, indent=1))
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            for token in names:
                data.pop(f"{token}_token_id", None)
            path.write_text(json.dumps(data, indent=1))


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """What the ``datasets`` library parses is cached here, not in the user's home (HF_DATASETS_CACHE)."""
    import datasets

    path = tmp_path_factory.mktemp("datasets-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", path)
        yield path


@pytest.fixture(scope="module")
def files(tmp_path_factory, datasets_cache):
    """The tiny model, copies of it with special tokens removed or a chat template added, prompt data and a
    scorer module."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # An in-process ZeRO-3 engine of an earlier test module (tests/training/test_backend.py) leaves transformers in
    # ZeRO-3 loading (HfDeepSpeedConfig is global), which would partition the models built here with zero.Init.
    unset_hf_deepspeed_config()
    root = tmp_path_factory.mktemp("user_data")
    model = build_tiny_model_dir(root / "model", "gpt2", seed=0)

    def variant(name, *tokens):
        d = root / name
        shutil.copytree(model, d)
        strip_special_tokens(d, *tokens)
        return d

    f = {"root": root, "model": model, "no_bos": variant("no_bos", "bos"),
         "no_bos_no_eos": variant("no_bos_no_eos", "bos", "eos"),
         "no_special": variant("no_special", "bos", "eos", "pad"), "chat": variant("chat")}
    add_chat_template(f["chat"])
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def f(", "import ")))
    write_prompt_data(root)
    (root / "user_scorers_mod.py").write_text(SCORER_MODULE)
    # A Hugging Face cache holding the tiny model and a tiny classifier under Hub ids, as `hf download` leaves it.
    from fdpg_scale.models.tiny_classifier import build_tiny_classifier_dir

    f["hub"] = root / "hub"
    shutil.copytree(model, fake_hub_entry(f["hub"], "models", "someone/tiny-gpt2"), dirs_exist_ok=True)
    build_tiny_classifier_dir(root / "classifier")
    f["reward"] = build_reward_head(root / "reward", num_labels=1)
    f["reward_chat"] = build_reward_head(root / "reward_chat", num_labels=1)
    add_chat_template(f["reward_chat"])
    f["reward_two"] = build_reward_head(root / "reward_two", num_labels=2)
    shutil.copytree(f["reward_chat"], fake_hub_entry(f["hub"], "models", "someone/tiny-reward"), dirs_exist_ok=True)
    shutil.copytree(root / "classifier", fake_hub_entry(f["hub"], "models", "someone/tiny-classifier"),
                    dirs_exist_ok=True)
    return f


def build_reward_head(path: Path, *, num_labels: int) -> Path:
    """A GPT-2 reward model (``GPT2ForSequenceClassification``, random weights) with the tiny tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from fdpg_scale.models.tiny import train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok), num_labels=num_labels,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# A small Jinja chat template, as a chat model's tokenizer carries one (Qwen's writes <|im_start|>role ...).
CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant:{% endif %}")


def add_chat_template(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)


# Prompts with a reference answer per row: the answer a scorer compares with.
ANSWERS = {"def f(": "x", "import ": "os", "class A": ":"}


def write_prompt_data(root: Path) -> None:
    """The same prompts as parquet, CSV, JSON Lines, a JSON list, a saved DatasetDict (train/test) and a fake
    Hub dataset; plus broken files."""
    import datasets

    table = datasets.Dataset.from_dict({"question": list(ANSWERS), "answer": list(ANSWERS.values()),
                                        "source": ["a", "b", "c"]})
    table.to_parquet(str(root / "prompts.parquet"))
    table.to_csv(str(root / "prompts.csv"), index=False)
    table.to_json(str(root / "rows.jsonl"))
    (root / "rows.json").write_text(json.dumps(table.to_list()))
    datasets.DatasetDict(train=table, test=table.select([2])).save_to_disk(str(root / "saved"))
    datasets.Dataset.from_dict({"question": ["ok", None], "answer": ["a", "b"]}).to_parquet(str(root / "null.parquet"))
    (root / "prompts.txt").write_text("def f(\n")
    (root / "broken.jsonl").write_text('{"question": "a"}\n{"question": \n')
    chats = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "def f("}], "import "]
    (root / "chats.jsonl").write_text("".join(json.dumps({"prompt": c}) + "\n" for c in chats))
    (root / "bad_chat.jsonl").write_text(json.dumps({"prompt": [{"role": "user"}]}) + "\n")


# A user's scorer module: it checks that every sample's answer is its own prompt's (the metadata travels with
# the context through sampling), then rewards the completions that contain it.
SCORER_MODULE = f"""
ANSWERS = {ANSWERS!r}


def answer_reward(texts, contexts, answer):
    for c, a in zip(contexts, answer):
        if ANSWERS[c] != a:
            raise AssertionError(f"sample of prompt {{c!r}} got the answer {{a!r}}")
    return [float(a in t) for t, a in zip(texts, answer)]


def takes_answer_only(texts, answer):
    return [0.0 for _ in texts]


def takes_any(texts, **columns):
    return [float(len(columns)) for _ in texts]
"""


# ------------------------------------------------------------------------------------- special tokens
class Tok:
    name_or_path = "some/model"

    def __init__(self, bos, eos, pad):
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, pad


def test_start_token_is_bos_else_eos_and_the_three_tokens_are_checked_together():
    assert start_id(Tok(0, 1, 2)) == 0 and start_id(Tok(None, 1, 2)) == 1
    assert padding_id(Tok(None, 1, None)) == 1
    with pytest.raises(ValueError, match="'some/model' defines neither a BOS token nor an EOS token"):
        start_id(Tok(None, None, 2))
    assert special_token_problem(Tok(None, 1, None)) is None  # Qwen-like: EOS stands in for both
    assert special_token_problem(Tok(0, None, 2)) is None      # no EOS: samples just run to max_new_tokens
    assert "neither a BOS token nor an EOS token" in special_token_problem(Tok(None, None, 2))
    assert "neither a pad token nor an EOS token" in special_token_problem(Tok(0, None, None))
    assert "no BOS, EOS or pad token" in special_token_problem(Tok(None, None, None))


def test_the_bos_less_copy_is_what_a_qwen_tokenizer_looks_like(files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files["no_bos"])
    assert tok.bos_token_id is None and tok.eos_token_id is not None and tok.pad_token_id is not None
    tok = AutoTokenizer.from_pretrained(files["no_bos_no_eos"])
    assert tok.bos_token_id is None and tok.eos_token_id is None


def test_prompts_and_unconditional_samples_start_from_eos_without_bos(files):
    """What the model is conditioned on: EOS in front of each prompt, and EOS alone for an unconditional draw."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fdpg_scale.apps.evaluate import sample_and_score
    from fdpg_scale.targets.tasks import build_task
    from fdpg_scale.training.config import TargetConfig
    from fdpg_scale.training.prompts import load_prompts

    tok = AutoTokenizer.from_pretrained(files["no_bos"])
    prompts = load_prompts(files["root"] / "prompts.jsonl", tok)
    assert [ids[0] for ids in prompts.token_ids] == [tok.eos_token_id] * 2
    assert list(prompts.token_ids[0][1:]) == tok("def f(", add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(files["no_bos"], dtype=torch.float32).eval()
    task = build_task(TargetConfig(scorer="contains", scorer_args={"substring": "e"}))
    out = sample_and_score(model, tok, task, n=3, max_new_tokens=4, seed=0)
    assert out["prompt_ids"].tolist() == [[tok.eos_token_id]] * 3


# ------------------------------------------------------------------------------------- prompt datasets
@pytest.mark.parametrize("source, split", [("prompts.parquet", "train"), ("prompts.csv", "train"),
                                           ("rows.jsonl", "train"), ("rows.json", "train"), ("saved", "train"),
                                           ("saved", "test")])
def test_every_source_gives_the_same_prompts_and_metadata(files, source, split):
    from transformers import AutoTokenizer

    from fdpg_scale.training.config import TargetConfig
    from fdpg_scale.training.prompts import load_target_prompts

    tok = AutoTokenizer.from_pretrained(files["model"])
    target = TargetConfig(prompts=str(files["root"] / source), split=split, prompt_column="question")
    prompts = load_target_prompts(target, tok)
    rows = slice(None) if split == "train" else slice(2, 3)
    assert prompts.texts == tuple(list(ANSWERS)[rows])
    assert prompts.metadata == {"answer": tuple(list(ANSWERS.values())[rows]), "source": ("a", "b", "c")[rows]}
    assert prompts.token_ids[0] == (tok.bos_token_id, *tok(prompts.texts[0], add_special_tokens=False)["input_ids"])
    assert prompts.metadata_of([1, 0, 1] if split == "train" else [0])["answer"] == \
        (["os", "x", "os"] if split == "train" else [":"])
    only = load_target_prompts(TargetConfig(prompts=target.prompts, split=split, prompt_column="question",
                                            metadata_columns=["answer"]), tok)
    assert list(only.metadata) == ["answer"]


def test_the_jsonl_prompts_file_keeps_working_beside_prompts(files):
    from transformers import AutoTokenizer

    from fdpg_scale.training.config import TargetConfig
    from fdpg_scale.training.prompts import load_prompts, load_target_prompts

    tok = AutoTokenizer.from_pretrained(files["model"])
    old = load_target_prompts(TargetConfig(prompts_file=str(files["root"] / "prompts.jsonl")), tok)
    new = load_target_prompts(TargetConfig(prompts=str(files["root"] / "prompts.jsonl")), tok)
    assert old == load_prompts(files["root"] / "prompts.jsonl", tok)
    assert (old.texts, old.token_ids) == (new.texts, new.token_ids) and old.metadata == new.metadata == {}
    assert load_target_prompts(TargetConfig(), tok) is None


def test_a_hub_dataset_id_is_read_from_the_local_cache(files, tmp_path, monkeypatch):
    """A Hub dataset's cache layout (datasets--owner--name/snapshots/<commit>/..., refs/main), built by hand."""
    from huggingface_hub import constants
    from transformers import AutoTokenizer

    from fdpg_scale.training.config import TargetConfig
    from fdpg_scale.training.prompts import load_target_prompts

    snapshot = fake_hub_entry(tmp_path / "hub", "datasets", "someone/prompts")
    (snapshot / "data").mkdir()
    shutil.copy(files["root"] / "prompts.parquet", snapshot / "data" / "train-00000-of-00001.parquet")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    prompts = load_target_prompts(TargetConfig(prompts="someone/prompts", prompt_column="question"),
                                  AutoTokenizer.from_pretrained(files["model"]))
    assert prompts.texts == tuple(ANSWERS) and prompts.metadata["answer"] == tuple(ANSWERS.values())


def fake_hub_entry(cache: Path, kind: str, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in a Hugging Face cache at ``cache`` (as ``hf download`` lays it out:
    ``<kind>--owner--name/snapshots/<commit>/`` and ``refs/main`` naming the commit); returns it, empty."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"{kind}--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


# ------------------------------------------------------------------------------------- chat templates
def test_prompts_go_through_the_chat_template_when_the_tokenizer_has_one(files):
    from transformers import AutoTokenizer

    from fdpg_scale.training.config import TargetConfig
    from fdpg_scale.training.prompts import load_target_prompts

    tok = AutoTokenizer.from_pretrained(files["chat"])
    chats = str(files["root"] / "chats.jsonl")
    prompts = load_target_prompts(TargetConfig(prompts=chats), tok)
    first = tok.decode(prompts.token_ids[0])
    assert first == "<|bos|>system: be brief\n<|bos|>user: def f(\n<|bos|>assistant:", first
    assert tok.decode(prompts.token_ids[1]) == "<|bos|>user: import \n<|bos|>assistant:"
    assert prompts.texts == ("def f(", "import ")        # what scorers see: the last message's content
    off = load_target_prompts(TargetConfig(prompts=str(files["root"] / "prompts.jsonl"), chat_template=False), tok)
    assert off.token_ids[0] == (tok.bos_token_id, *tok("def f(", add_special_tokens=False)["input_ids"])
    # The same prompt file on the template-less model: plain text after the start token.
    plain = load_target_prompts(TargetConfig(prompts=str(files["root"] / "prompts.jsonl")),
                                AutoTokenizer.from_pretrained(files["model"]))
    assert plain.token_ids == off.token_ids


# ---------------------------------------------------------------------------------------- Hub ids
def test_hub_ids_of_a_model_and_a_classifier_resolve_to_their_cached_snapshots(files, tmp_path, monkeypatch):
    import torch
    from huggingface_hub import constants

    from fdpg_scale.targets.hf_classifier import HFClassifier
    from fdpg_scale.targets.samples import Samples
    from fdpg_scale.training.config import load_config
    from fdpg_scale.training.run_setup import prepare_model_dir

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(files["hub"]))
    cfg = load_config(SMOKE, ["model.path=someone/tiny-gpt2", "model.build=null", f"output_dir={tmp_path}"])
    model_dir = preflight(cfg, world_size=1)
    assert model_dir.parent.parent.name == "models--someone--tiny-gpt2" and (model_dir / "config.json").is_file()
    by_id = HFClassifier(path="someone/tiny-classifier", label="positive")
    by_dir = HFClassifier(path=str(files["root"] / "classifier"), label="positive")
    samples = Samples(token_ids=torch.zeros(2, 1, dtype=torch.long), mask=torch.ones(2, 1), texts=["def f", "x"])
    assert torch.equal(by_id(samples), by_dir(samples))
    # A local directory wins over a Hub id of the same name (the id is only looked up when no such path exists).
    monkeypatch.chdir(files["root"])
    (files["root"] / "someone").mkdir(exist_ok=True)
    shutil.copytree(files["model"], files["root"] / "someone" / "tiny-gpt2", dirs_exist_ok=True)
    assert prepare_model_dir(cfg.model) == Path("someone/tiny-gpt2")


# ------------------------------------------------------------------------------------- reward models
def _pairs():
    import torch

    from fdpg_scale.targets.samples import Samples

    return Samples(token_ids=torch.zeros(3, 1, dtype=torch.long), mask=torch.ones(3, 1), texts=["x = 1", "x = 1", ""],
                   context_ids=torch.tensor([0, 1, 0]), contexts=["def f(", "import ", "def f("])


def test_the_reward_model_scores_prompt_plus_completion_frozen(files):
    """r = the head's logit on the prompt followed by the completion: the same completion scores differently
    after different prompts, and equals the model's own forward on the joined text."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fdpg_scale.targets.hf_reward_model import HFRewardModel

    rm = HFRewardModel(path=str(files["reward"]))
    r = rm(_pairs())
    assert r.shape == (3,) and r.dtype == torch.float32 and r[0] != r[1]
    tok = AutoTokenizer.from_pretrained(files["reward"])
    model = AutoModelForSequenceClassification.from_pretrained(files["reward"]).eval()
    with torch.no_grad():
        expected = [model(**tok(t, return_tensors="pt")).logits[0, 0] for t in ("def f(x = 1", "import x = 1")]
    torch.testing.assert_close(r[:2], torch.stack(expected))
    assert not rm.classifier.model.training and not any(p.requires_grad for p in rm.classifier.model.parameters())


def test_the_reward_model_renders_the_pair_with_its_own_chat_template(files):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fdpg_scale.targets.hf_reward_model import HFRewardModel

    rm = HFRewardModel(path=str(files["reward_chat"]))
    assert rm.texts(_pairs())[0] == "<|bos|>user: def f(\n<|bos|>assistant: x = 1\n"
    tok = AutoTokenizer.from_pretrained(files["reward_chat"])
    model = AutoModelForSequenceClassification.from_pretrained(files["reward_chat"]).eval()
    with torch.no_grad():
        expected = model(**tok(rm.texts(_pairs())[1], return_tensors="pt", add_special_tokens=False)).logits[0, 0]
    torch.testing.assert_close(rm(_pairs())[1], expected)


@pytest.mark.parametrize("run_dtype, args, expected", [("bf16", {}, "bfloat16"), ("fp32", {}, "float32"),
                                                       ("bf16", {"dtype": "fp32"}, "float32")])
def test_a_model_scorer_runs_in_the_runs_dtype_unless_its_scorer_args_say_otherwise(files, run_dtype, args, expected):
    from fdpg_scale.targets.tasks import build_task
    from fdpg_scale.training.config import TargetConfig

    target = TargetConfig(kind="reward", scorer="hf-reward-model", scorer_args={"path": str(files["reward"]), **args})
    model = build_task(target, dtype=run_dtype).columns[0].values.fn.classifier.model
    assert {str(p.dtype) for p in model.parameters()} == {f"torch.{expected}"}


def test_plan_reads_the_architecture_of_a_cached_hub_id(files, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(files["hub"]))
    status = cli.main(["plan", "--config", str(SMOKE), "--nodes", "1", "--gpus-per-node", "1",
                       "model.path=someone/tiny-gpt2", "model.build=null"])
    out = capsys.readouterr().out
    assert status == 0 and "models--someone--tiny-gpt2" in out.splitlines()[0], out


@pytest.mark.parametrize("dtype, classifier_dtype", [("bf16", None), ("fp32", None), ("bf16", "fp32")])
def test_plan_counts_a_full_copy_of_each_model_scorer_per_gpu_in_its_dtype(files, monkeypatch, capsys, dtype,
                                                                          classifier_dtype):
    """A reward model (local directory) and a classifier (Hub id) beside the policy: each is a resident part of
    P_s·b bytes per GPU, whatever the world size, in the run's dtype unless its scorer_args.dtype says otherwise."""
    from huggingface_hub import constants
    from transformers import AutoModelForSequenceClassification

    from fdpg_scale.apps.plan import scorer_parts
    from fdpg_scale.training.config import load_config

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(files["hub"]))
    classifier_args = "path: someone/tiny-classifier, label: positive" + (f", dtype: {classifier_dtype}"
                                                                          if classifier_dtype else "")
    ds_config = ROOT / "configs" / "deepspeed" / ("zero3_bf16.json" if dtype == "bf16" else "zero3_cpu.json")
    overrides = ["model.build=null", f"model.path={files['model']}", f"model.dtype={dtype}", "target.scorer_args={}",
                 f"deepspeed.config={ds_config}",
                 "target.scorers=[{scorer: hf-reward-model, kind: reward, scorer_args: {path: " + str(files["reward"]) +
                 "}}, {scorer: hf-classifier, kind: reward, scorer_args: {" + classifier_args + "}}]"]
    status = cli.main(["plan", "--config", str(SMOKE), "--nodes", "1", "--gpus-per-node", "2", *overrides])
    out, err = capsys.readouterr()
    assert status == 0, err
    n_reward, n_classifier = (sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(d).parameters())
                              for d in (files["reward"], files["root"] / "classifier"))
    width = {"fp32": 4, "bf16": 2}
    expected = {f"scorer hf-reward-model ({files['reward']}, {n_reward:,} parameters, {dtype})":
                n_reward * width[dtype],
                f"scorer hf-classifier (someone/tiny-classifier, {n_classifier:,} parameters, "
                f"{classifier_dtype or dtype})": n_classifier * width[classifier_dtype or dtype]}
    assert scorer_parts(load_config(SMOKE, overrides)) == expected
    resident = out[:out.index("  generation")]        # listed among the resident parts of each GPU
    assert all(f"    {name}" in resident for name in expected), out


def test_plan_names_a_model_scorer_that_is_not_on_this_machine(files, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(files["hub"]))
    status = cli.main(["plan", "--config", str(SMOKE), "--nodes", "1", "--gpus-per-node", "1", "model.build=null",
                       f"model.path={files['model']}", "target.kind=reward", "target.scorer=hf-reward-model",
                       "target.scorer_args={path: someone/absent-reward}"])
    line = one_line(capsys.readouterr().err)
    assert status == 2 and "target.scorer_args.path 'someone/absent-reward' is not a local path" in line, line


# --------------------------------------------------------------------------- evaluation during training
def test_evaluations_follow_every_n_steps_and_the_last():
    from fdpg_scale.training.in_run_eval import is_due

    assert [s for s in range(1, 8) if is_due(s, every=3, total=7)] == [3, 6, 7]
    assert not any(is_due(s, every=0, total=7) for s in range(1, 8))


# -------------------------------------------------------------------------------- one-line bad inputs
# (id, overrides, world size, what the one line must contain); "{x}" is filled from the `files` fixture.
P = "target.prompt_column=question"
ROWS = [
    ("tokenizer-no-bos-no-eos", ["model.path={no_bos_no_eos}"], 1, "neither a BOS token nor an EOS token"),
    ("tokenizer-no-special-tokens", ["model.path={no_special}"], 1, "no BOS, EOS or pad token"),
    # ---- prompt datasets
    ("prompts-missing-file", ["target.prompts={root}/absent.parquet"], 1, "absent.parquet': no such file"),
    ("prompts-unknown-type", ["target.prompts={root}/prompts.txt"], 1, "unknown file type '.txt'"),
    ("prompts-unparsable", ["target.prompts={root}/broken.jsonl"], 1, "broken.jsonl': cannot be read"),
    ("prompts-no-prompt-column", ["target.prompts={root}/prompts.parquet"], 1,
     "has no column 'prompt' (target.prompt_column; its columns: question, answer, source)"),
    ("prompts-no-metadata-column", ["target.prompts={root}/prompts.parquet", P, "target.metadata_columns=[answr]"], 1,
     "has no column 'answr' (target.metadata_columns"),
    ("prompts-metadata-is-prompt", ["target.prompts={root}/prompts.parquet", P, "target.metadata_columns=[question]"],
     1, "target.metadata_columns lists target.prompt_column 'question'"),
    ("prompts-null-row", ["target.prompts={root}/null.parquet", P], 1, "row 1 (counting from 0), column 'question'"),
    ("prompts-unknown-split", ["target.prompts={root}/saved", P, "target.split=validation"], 1,
     "has no split 'validation' (target.split; its splits: train, test)"),
    ("prompts-file-split", ["target.prompts={root}/prompts.parquet", P, "target.split=test"], 1, "split 'test'"),
    ("prompts-unknown-hub-id", ["target.prompts=nobody/no-such-prompts"], 1,
     "the Hub dataset 'nobody/no-such-prompts' is not in the local Hugging Face cache (looked in"),
    ("prompts-and-prompts-file", ["target.prompts={root}/prompts.parquet", "target.prompts_file={root}/prompts.jsonl"],
     1, "target.prompts and target.prompts_file are both set"),
    ("prompts-distributional", ["target.prompts={root}/prompts.parquet", "target.kind=distributional",
                                "target.moment=0.5"], 1, "target.prompts (a conditional target)"),
    ("prompt-column-empty", ["target.prompts={root}/prompts.parquet", "target.prompt_column="], 1,
     "target.prompt_column"),
    # ---- metadata columns and the scorers that receive them
    ("scorer-misses-a-column", ["target.prompts={root}/prompts.parquet", P, "target.kind=reward",
                                "target.scorer=user_scorers_mod:takes_answer_only", "target.scorer_args={{}}"], 1,
     "does not take the prompt column 'source'"),
    ("scorer-column-clashes-with-args", ["target.prompts={root}/prompts.parquet", P, "target.kind=reward",
                                         "target.scorer=user_scorers_mod:takes_any",
                                         "target.scorer_args={{answer: 1}}"], 1,
     "the prompt column 'answer' has the name of a scorer_args key"),
    ("scorer-contexts-unconditional", ["target.kind=reward", "target.scorer=user_scorers_mod:answer_reward",
                                       "target.scorer_args={{}}"], 1,
     "needs contexts, but the target is unconditional"),
    # ---- chat templates
    ("chat-template-missing", ["target.prompts={root}/prompts.parquet", P, "target.chat_template=true"], 1,
     "target.chat_template is true, but the tokenizer"),
    ("chat-template-unconditional", ["model.path={chat}", "target.chat_template=true"], 1,
     "the target has no prompts"),
    ("messages-without-template", ["target.prompts={root}/chats.jsonl"], 1,
     "row 0 (counting from 0), column 'prompt' is a list of messages, but prompts are not rendered"),
    ("messages-template-off", ["model.path={chat}", "target.prompts={root}/chats.jsonl", "target.chat_template=false"],
     1, "is a list of messages"),
    ("messages-bad-message", ["model.path={chat}", "target.prompts={root}/bad_chat.jsonl"], 1,
     "row 0 (counting from 0), column 'prompt' must be a non-empty string or a list of"),
    ("chat-template-not-bool", ["target.chat_template=maybe"], 1, "target.chat_template"),
    # ---- reward models
    ("reward-model-needs-label", ["target.kind=reward", "target.scorer=hf-reward-model",
                                  "target.scorer_args={{path: {reward_two}}}"], 1,
     "the model has 2 outputs; name the reward's in scorer_args.label"),
    ("reward-model-unknown-arg", ["target.kind=reward", "target.scorer=hf-reward-model",
                                  "target.scorer_args={{path: {reward}, threshold: 0.5}}"], 1,
     "unknown scorer_args ['threshold']"),
    ("reward-model-no-path", ["target.kind=reward", "target.scorer=hf-reward-model", "target.scorer_args={{}}"], 1,
     "scorer_args ['path'] is required"),
    ("reward-model-not-cached", ["target.kind=reward", "target.scorer=hf-reward-model",
                                 "target.scorer_args={{path: someone/absent-reward}}"], 1,
     "the Hub model 'someone/absent-reward' is not in the local Hugging Face cache"),
    # ---- evaluation during training
    ("eval-samples-indivisible", ["eval.every=1", "eval.samples=12"], 2,
     "eval.samples=12 is not a multiple of train.micro_batch × world size = 4 × 2 = 8"),
    ("eval-every-negative", ["eval.every=-1"], 1, "eval.every must be ≥ 0"),
    ("eval-samples-zero", ["eval.samples=0"], 1, "eval.samples must be ≥ 1"),
    # ---- Hub ids: read from the local cache only
    ("model-hub-id-not-cached", ["model.path=someone/absent-model"], 1,
     "model.path 'someone/absent-model' is not a local path, and the Hub model 'someone/absent-model' is not in "
     "the local Hugging Face cache (looked in {hub})"),
    ("classifier-hub-id-not-cached", ["target.kind=reward", "target.scorer=hf-classifier",
                                      "target.scorer_args={{path: someone/absent-classifier, label: positive}}"], 1,
     "the Hub model 'someone/absent-classifier' is not in the local Hugging Face cache (looked in {hub})"),
]


@pytest.mark.parametrize("case, args, world, culprit", ROWS, ids=[r[0] for r in ROWS])
def test_train_rejects_in_one_line(case, args, world, culprit, files, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(loop, "train", lambda cfg: preflight(cfg, world_size=world))
    monkeypatch.syspath_prepend(str(files["root"]))      # the user's scorer module
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(files["hub"]))
    overrides = fill_paths(args, files)
    defaults = [f"model.path={files['model']}", "model.build=null", f"output_dir={tmp_path / 'run'}"]
    defaults = [d for d in defaults if not any(o.startswith(d.split("=")[0] + "=") for o in overrides)]
    capsys.readouterr()
    status = cli.main(["train", "--config", str(SMOKE), *defaults, *overrides])
    line = one_line(capsys.readouterr().err)
    assert status == EXIT_BAD_INPUT, (status, line)
    assert culprit.format(hub=files["hub"]) in line, line


def readme_commands(data: Path, run: Path) -> list[list[str]]:
    """The commands of README's "Your own model and data" block, as argument lists, with its data and run
    directories replaced by ``data`` and ``run``."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Your own model and data"):].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = re.split(r"\n(?=\.venv/bin/)", block.replace("\\\n", " ").strip())
    return [[a.replace(".cache/user-data", str(data)).replace("runs/mine", str(run)) for a in shlex.split(c)]
            for c in commands]


@pytest.mark.slow
def test_the_readme_example_passes_the_pre_start_checks_for_its_2_ranks(tmp_path, monkeypatch, capsys):
    """README, "Your own model and data", as written: the data script's model has no BOS and a chat template, and
    its train command checks the run for 2 ranks, then would start torchrun with the same overrides."""
    from transformers import AutoTokenizer

    from fdpg_scale.apps import train_launch

    build, train, evaluate = readme_commands(tmp_path / "data", tmp_path / "run")
    assert build[:2] == [".venv/bin/python", "examples/build_user_data.py"] and evaluate[1] == "eval"
    subprocess.run([sys.executable, *build[1:]], cwd=ROOT, check=True, capture_output=True, timeout=300)
    tok = AutoTokenizer.from_pretrained(tmp_path / "data" / "chat-model")
    assert tok.bos_token_id is None and tok.chat_template is not None
    started = []

    class Torchrun:                                      # records the ranks' command instead of starting them
        pid = -1

        def __init__(self, cmd, **kwargs):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(train_launch.subprocess, "Popen", Torchrun)
    monkeypatch.chdir(ROOT)                              # examples.my_scorers resolves from the repository root
    assert train[0] == ".venv/bin/fdpg-scale" and train[1:4] == ["train", "--nproc-per-node", "2"]
    status = cli.main(train[1:])
    assert status == 0, capsys.readouterr().err
    (cmd,) = started
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[-len(train[4:]):] == train[4:]            # --config and every override, unchanged


# ---------------------------------------------------------------------------------------- processes
def _run(*args: str, env: dict | None = None) -> str:
    proc = run_cli(*args, env=env)
    return proc.stdout + proc.stderr


TRAIN = ("train", "--config", str(SMOKE), "model.build=null", "train.steps=2", "train.save_every=2",
         "logging.progress_bar=false", "logging.tensorboard=false")


@pytest.mark.slow
def test_train_eval_export_with_a_tokenizer_without_bos(files, tmp_path):
    """Unconditional and conditional, as a Qwen tokenizer (no BOS) would be used."""
    from transformers import AutoTokenizer

    out, conditional = tmp_path / "run", tmp_path / "conditional"
    side_by_side(lambda: _run(*TRAIN, f"model.path={files['no_bos']}", f"output_dir={out}"),
                 lambda: _run(*TRAIN, f"model.path={files['no_bos']}", f"output_dir={conditional}",
                              f"target.prompts_file={files['root'] / 'prompts.jsonl'}"))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    side_by_side(lambda: _run("eval", str(out), "--samples", "8"),
                 lambda: _run("eval", str(conditional), "--samples", "8"),
                 lambda: _run("export", str(out), "--to", str(tmp_path / "hf")))
    assert json.loads((out / "eval.json").read_text())["n"] == 8
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").bos_token_id is None
    assert json.loads((conditional / "eval.json").read_text())["contexts_with_support"].endswith("/2")


@pytest.mark.slow
def test_train_and_eval_on_a_parquet_prompt_set_with_answers_through_a_chat_template(files, datasets_cache, tmp_path):
    """A chat model's tokenizer, parquet prompts with an ``answer`` column, and a scorer that reads it: the
    scorer raises if any sample's answer is not its own prompt's, so a finished run shows the rows stayed aligned."""
    out = tmp_path / "run"
    env = {"PYTHONPATH": str(files["root"]), "HF_DATASETS_CACHE": str(datasets_cache)}
    _run(*TRAIN, f"model.path={files['chat']}", f"output_dir={out}",
         f"target.prompts={files['root'] / 'prompts.parquet'}", "target.prompt_column=question",
         "target.metadata_columns=[answer]", "target.kind=reward", "target.scorer=user_scorers_mod:answer_reward",
         "target.scorer_args={}", env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("alignment" in r for r in rows)
    _run("eval", str(out), "--samples", "6", env=env)
    report = json.loads((out / "eval.json").read_text())
    assert report["contexts_with_support"].endswith("/3") and 0.0 <= report["policy"]["alignment"] <= 1.0


@pytest.mark.slow
def test_train_and_eval_hub_ids_with_a_classifier_and_a_reward_model_of_the_prompts_offline(files, datasets_cache,
                                                                                            tmp_path):
    """model.path, the classifier's and the reward model's paths are Hub ids, read from a cache laid out as
    `hf download` does (HF_HUB_CACHE), with the Hub switched off (HF_HUB_OFFLINE=1); the reward model scores
    prompt + completion through its own chat template."""
    out = tmp_path / "run"
    env = {"HF_HUB_CACHE": str(files["hub"]), "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(datasets_cache)}
    scorers = ("target.scorers=[{scorer: hf-classifier, kind: reward, scorer_args: {path: someone/tiny-classifier, "
               "label: positive}}, {scorer: hf-reward-model, kind: reward, scorer_args: {path: someone/tiny-reward}}]")
    log = _run(*TRAIN, "model.path=someone/tiny-gpt2", f"output_dir={out}", "target.scorer_args={}", scorers,
               f"target.prompts={files['root'] / 'prompts.parquet'}", "target.prompt_column=question",
               "target.metadata_columns=[]", env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2], log
    assert all("alignment/hf-classifier" in r and "alignment/hf-reward-model" in r for r in rows), rows[0]
    _run("eval", str(out), "--samples", "6", env=env)
    report = json.loads((out / "eval.json").read_text())
    assert report["n"] == 6 and "alignment/hf-reward-model" in report["policy"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_read_the_parquet_prompts_and_keep_each_samples_answer(files, datasets_cache, tmp_path):
    """torchrun on 2 ranks: both read the dataset (one datasets cache), and the scorer's check that every sample's
    answer is its own prompt's holds on each rank's share."""
    out = tmp_path / "run"
    proc = run_cli(*TRAIN, f"model.path={files['chat']}", f"output_dir={out}",
                   f"target.prompts={files['root'] / 'prompts.parquet'}", "target.prompt_column=question",
                   "target.metadata_columns=[answer]", "target.kind=reward", "target.scorer=user_scorers_mod:answer_reward",
                   "target.scorer_args={}", nproc=2, check=False,
                   env={"PYTHONPATH": str(files["root"]), "HF_DATASETS_CACHE": str(datasets_cache / "two")})
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_evaluation_during_training_logs_eval_metrics_and_changes_no_training_number(files, datasets_cache,
                                                                                     tmp_path):
    """eval.every=1 on a conditional target: every step's row carries eval/*, and every training number equals
    a run without evaluation's (the evaluation draws from its own seed stream)."""
    common = (f"model.path={files['model']}", f"target.prompts={files['root'] / 'prompts.parquet'}",
              "target.prompt_column=question", "target.metadata_columns=[]")
    env = {"HF_DATASETS_CACHE": str(datasets_cache)}
    _run(*TRAIN, *common, f"output_dir={tmp_path / 'plain'}", env=env)
    _run(*TRAIN, *common, f"output_dir={tmp_path / 'eval'}", "eval.every=1", "eval.samples=8", env=env)
    plain, evaluated = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                        for name in ("plain", "eval"))
    for a, b in zip(plain, evaluated, strict=True):
        for key in ("loss", "log_z", "kl_p_pi", "alignment", "pseudo_reward_mean"):
            assert a[key] == b[key], (key, a[key], b[key])
        for key in ("eval/alignment", "eval/kl_pi_a", "eval/kl_p_pi", "eval/ess", "eval/distinct_1",
                    "eval/self_bleu_3"):
            assert key in b and b[key] is not None, (key, sorted(b))
        assert 0.0 <= b["eval/alignment"] <= 1.0 and b["eval/ess"] <= 8.0
