"""modernbert-export --average: the uniform average of checkpoints' weights, exactly; mismatches refused."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from modernbert_train.hf import from_hf
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.train.export import cli
from modernbert_train.train.run_metadata import RunMetadata

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
             pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)  # fmt: skip


def write_checkpoint(path, tokenizer_file, seed, **overrides):
    """A checkpoint as modernbert-train saves one: ModernBertMLM's weights under state/model ("model."
    prefix) and the run's metadata under the RunMetadata callback."""
    torch.manual_seed(seed)
    model = ModernBertForMaskedLM(ModernBertConfig(**{**SHAPE, **overrides}))
    metadata = RunMetadata(model.config.to_dict(), str(tokenizer_file), {}).state_dict()
    weights = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state": {"model": weights, "callbacks": {"RunMetadata": metadata}}}, path)
    return model.state_dict()


@pytest.fixture
def tokenizer_file(tmp_path):
    vocab = {token: i for i, token in enumerate(["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "a", "b"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def test_average_of_checkpoints_is_exact(tmp_path, tokenizer_file, capsys):
    states = [write_checkpoint(tmp_path / f"ba{i}.pt", tokenizer_file, seed=i) for i in range(3)]
    cli(["--average", *(str(tmp_path / f"ba{i}.pt") for i in range(3)), str(tmp_path / "avg")])
    assert "average of 3 checkpoints" in capsys.readouterr().out
    averaged = from_hf(tmp_path / "avg").state_dict()
    for key, value in averaged.items():
        expected = (sum(state[key].double() for state in states) / 3).float()
        assert torch.equal(value, expected), key
    assert (tmp_path / "avg" / "tokenizer.json").is_file()


def test_one_checkpoint_given_twice_is_refused_naming_both(tmp_path, tokenizer_file, capsys, monkeypatch):
    """A glob over a run folder matches a checkpoint and the latest-rank0.pt link to it: averaged, the newest
    would weigh double. Refused in one line naming both arguments, however the second spells the file."""
    run = tmp_path / "run0"
    run.mkdir()
    write_checkpoint(run / "ep0-ba400-rank0.pt", tokenizer_file, seed=0)
    write_checkpoint(run / "ep1-ba800-rank0.pt", tokenizer_file, seed=1)
    (run / "latest-rank0.pt").symlink_to("ep1-ba800-rank0.pt")
    monkeypatch.chdir(tmp_path)
    cases = [
        (sorted(str(p) for p in run.glob("*.pt")), "run0/latest-rank0.pt is a link to"),  # a shell's glob
        (["run0/ep1-ba800-rank0.pt", "run0/ep1-ba800-rank0.pt"], ""),
        (["run0/ep1-ba800-rank0.pt", "run0/../run0/ep1-ba800-rank0.pt"], ""),
        (["run0/ep1-ba800-rank0.pt", str(run / "ep1-ba800-rank0.pt")], ""),
    ]
    for checkpoints, link in cases:
        with pytest.raises(SystemExit) as exit:
            cli(["--average", *checkpoints, "out"])
        assert exit.value.code == 2
        error = capsys.readouterr().err.strip()
        twice = [c for c in checkpoints if (tmp_path / c).resolve() == (run / "ep1-ba800-rank0.pt")]
        assert f"checkpoints {twice[0]} and {twice[1]} are the same checkpoint" in error, error
        assert link in error and len(error.splitlines()) == 1, error
        assert not (tmp_path / "out").exists()
    # Two distinct files are averaged; the link alone stands for its file.
    cli(["--average", "run0/ep0-ba400-rank0.pt", "run0/latest-rank0.pt", "out"])
    assert "the average of 2 checkpoints" in capsys.readouterr().out


def test_the_same_uri_twice_is_refused(tmp_path, tokenizer_file, s3_bucket, capsys):
    from modernbert_train import storage

    write_checkpoint(tmp_path / "a.pt", tokenizer_file, seed=0)
    uri = storage.join(s3_bucket, "run", "ep0-ba1-rank0.pt")
    storage.upload_file(tmp_path / "a.pt", uri)
    with pytest.raises(SystemExit) as exit:
        cli(["--average", uri, str(tmp_path / "a.pt"), uri, str(tmp_path / "out")])
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert f"checkpoints {uri} and {uri} are the same checkpoint" in error and len(error.splitlines()) == 1


def test_weights_that_do_not_fit_their_own_config_are_one_line(tmp_path, tokenizer_file, capsys):
    """As for a single checkpoint's export: the first checkpoint, or a later one, named in one line."""
    write_checkpoint(tmp_path / "a.pt", tokenizer_file, seed=0)
    write_checkpoint(tmp_path / "b.pt", tokenizer_file, seed=1)
    torch.manual_seed(2)
    wider = ModernBertForMaskedLM(ModernBertConfig(**{**SHAPE, "intermediate_size": 64}))
    checkpoint = torch.load(tmp_path / "a.pt", weights_only=False)  # a's config, wider weights
    checkpoint["state"]["model"] = {f"model.{key}": value for key, value in wider.state_dict().items()}
    torch.save(checkpoint, tmp_path / "misfit.pt")
    for checkpoints in (["misfit.pt", "a.pt"], ["a.pt", "b.pt", "misfit.pt"]):
        with pytest.raises(SystemExit) as exit:
            cli(["--average", *(str(tmp_path / name) for name in checkpoints), str(tmp_path / "out")])
        assert exit.value.code == 2
        error = capsys.readouterr().err.strip()
        expected = f"checkpoint {tmp_path / 'misfit.pt'}: its weights do not fit its model config (size"
        assert expected in error and len(error.splitlines()) == 1, error
        assert not (tmp_path / "out").exists()


def test_average_refuses_mismatched_or_missing_checkpoints(tmp_path, tokenizer_file, capsys):
    write_checkpoint(tmp_path / "a.pt", tokenizer_file, seed=0)
    write_checkpoint(tmp_path / "wide.pt", tokenizer_file, seed=1, intermediate_size=64)
    other = Tokenizer.from_file(str(tokenizer_file))
    other.add_tokens(["extra"])
    other.save(str(tmp_path / "other.json"))
    write_checkpoint(tmp_path / "other-tokenizer.pt", tmp_path / "other.json", seed=2)
    cases = [
        (["a.pt", "wide.pt"], "wide.pt has model intermediate_size=64, but"),
        (["a.pt", "other-tokenizer.pt"], "other-tokenizer.pt was trained with another tokenizer than"),
        (["a.pt", "missing.pt"], "checkpoint not found"),
        (["a.pt"], "needs at least two checkpoints and the output folder"),
    ]
    for checkpoints, expected in cases:
        with pytest.raises(SystemExit) as exit:
            cli(["--average", *(str(tmp_path / name) for name in checkpoints), str(tmp_path / "out")])
        assert exit.value.code == 2
        error = capsys.readouterr().err.strip()
        assert expected in error and len(error.splitlines()) == 1, error
        assert not (tmp_path / "out").exists()


def test_average_ships_the_checkpoints_tokenizer_in_any_file_never_another(tmp_path, tokenizer_file, capsys):
    """Checkpoints whose tokenizer.json differ only in formatting share a tokenizer; --tokenizer may ship
    another file of it, never another tokenizer (its ids would name other tokens)."""
    pretty = tmp_path / "pretty" / "tokenizer.json"
    pretty.parent.mkdir()
    Tokenizer.from_file(str(tokenizer_file)).save(str(pretty), pretty=False)
    assert pretty.read_text() != tokenizer_file.read_text()
    write_checkpoint(tmp_path / "a.pt", tokenizer_file, seed=0)
    write_checkpoint(tmp_path / "b.pt", pretty, seed=1)
    cli(["--average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), str(tmp_path / "avg"),
         "--tokenizer", str(pretty.parent)])  # fmt: skip
    assert from_hf(tmp_path / "avg").config.vocab_size >= Tokenizer.from_file(str(pretty)).get_vocab_size()
    other = Tokenizer.from_file(str(tokenizer_file))
    other.add_tokens(["extra"])
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(SystemExit) as exit:
        cli(["--average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), str(tmp_path / "out"),
             "--tokenizer", str(tmp_path / "other.json")])  # fmt: skip
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip()
    assert f"other.json: not the tokenizer checkpoint {tmp_path / 'a.pt'} was trained with" in error, error
    assert len(error.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_average_of_checkpoints_in_a_bucket_into_a_bucket(tmp_path, tokenizer_file, s3_bucket, capsys):
    from modernbert_train import storage

    states = [write_checkpoint(tmp_path / f"ba{i}.pt", tokenizer_file, seed=i) for i in range(2)]
    remote = [storage.join(s3_bucket, "run", f"ep0-ba{i}-rank0.pt") for i in range(2)]
    for i, uri in enumerate(remote):
        storage.upload_file(tmp_path / f"ba{i}.pt", uri)
    out = storage.join(s3_bucket, "run", "averaged")
    cli(["--average", *remote, out])
    assert "average of 2 checkpoints" in capsys.readouterr().out
    for key, value in from_hf(out).state_dict().items():
        assert torch.equal(value, ((states[0][key].double() + states[1][key].double()) / 2).float()), key
    with pytest.raises(SystemExit) as exit:
        cli(["--average", remote[0], storage.join(s3_bucket, "run", "gone.pt"), str(tmp_path / "o")])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"checkpoint not found: {s3_bucket}/run/gone.pt")
