"""tidal.text against transformers: the EOS ids a checkpoint declares and the engine's and scheduler's
stopping on them by default; the SmolLM2 tokenizer's encode, chat template and decode; streaming
detokenization equal to a whole decode on random, multilingual and chat token sequences; stop strings held
back and cut."""
import json
import random

import pytest
import torch

import tidal
from hf_models import greedy, make_model
from tidal import presets
from tidal.errors import CheckpointError, ConfigError
from tidal.text import IncrementalDetokenizer, StopMatcher, Tokenizer, eos_token_ids

MULTILINGUAL = ["日本語のテキストと中文字符", "emoji 🙂👍🏽 👨‍👩‍👧 🇫🇷 and more", "café naïve Ωμέγα Ж ключ",
                "mixed: 漢字🙂e\u0301\n\ttabs  and   spaces"]


@pytest.fixture(scope="module")
def smollm2():
    """The smollm2-135m checkpoint, built once into tidal's cache (shared with test_smollm2.py)."""
    return presets.resolve("smollm2-135m", log=lambda s: None)


@pytest.fixture(scope="module")
def tok(smollm2):
    return Tokenizer.from_checkpoint(smollm2)


@pytest.fixture(scope="module")
def hf_tok(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


# -- EOS ids -------------------------------------------------------------------------------------------------
def write(path, name, doc):
    (path / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))


def test_eos_ids_from_generation_config_else_config(tmp_path):
    assert eos_token_ids(tmp_path) == ()  # neither file
    write(tmp_path, "config.json", {"eos_token_id": 7})
    assert eos_token_ids(tmp_path) == (7,)
    write(tmp_path, "generation_config.json", {"eos_token_id": None})  # says nothing: config.json's
    assert eos_token_ids(tmp_path) == (7,)
    write(tmp_path, "generation_config.json", {"eos_token_id": [3, 9, 3]})
    assert eos_token_ids(tmp_path) == (3, 9)
    write(tmp_path, "generation_config.json", {"eos_token_id": 0})
    assert eos_token_ids(tmp_path) == (0,)
    write(tmp_path, "config.json", {"eos_token_id": None})
    (tmp_path / "generation_config.json").unlink()
    assert eos_token_ids(tmp_path) == ()


@pytest.mark.parametrize("doc, match", [("{not json", "not a valid JSON"), ("[1, 2]", "not a valid JSON"),
                                        ({"eos_token_id": True}, "eos_token_id=True"),
                                        ({"eos_token_id": [1, "2"]}, "eos_token_id="),
                                        ({"eos_token_id": -1}, "eos_token_id=-1")])
def test_eos_ids_malformed(tmp_path, doc, match):
    write(tmp_path, "generation_config.json", doc)
    with pytest.raises(CheckpointError, match=match):
        eos_token_ids(tmp_path)


def test_random_presets_declare_no_eos(tmp_path):
    path = presets.build("micro", torch.float32, cache_dir=tmp_path, log=lambda s: None)
    assert eos_token_ids(path) == ()
    with tidal.Engine.from_pretrained(path, device="cpu", block_size=4, kv_cache_bytes=1 << 20) as eng:
        assert eng.eos_token_ids == ()
        assert len(eng.generate([[1, 2, 3]], max_new_tokens=5)[0]) == 5


@pytest.fixture(scope="module")
def with_eos(tmp_path_factory):
    """(checkpoint whose generation_config.json declares EOS ids [stop, unused], the greedy continuation of
    PROMPT ignoring EOS, the continuation cut after `stop`)."""
    model = make_model("llama", std=0.5)
    want = greedy(model, torch.tensor([PROMPT]), NEW)[0, len(PROMPT):].tolist()
    stop = want[4]
    unused = next(t for t in range(model.config.vocab_size) if t not in want)
    model.generation_config.eos_token_id = [stop, unused]
    path = tmp_path_factory.mktemp("eos")
    model.save_pretrained(path)
    assert json.loads((path / "config.json").read_text()).get("eos_token_id") is None  # generation_config's
    return path, want, want[:want.index(stop) + 1], (stop, unused)


PROMPT, NEW = [5, 17, 99, 3, 42, 8], 10


def test_engine_stops_on_eos_by_default(with_eos):
    path, want, cut, eos = with_eos
    with tidal.Engine.from_pretrained(path, device="cpu", block_size=4, kv_cache_bytes=1 << 20) as eng:
        assert eng.eos_token_ids == eos
        assert eng.generate([PROMPT], max_new_tokens=NEW) == [cut]
        assert eng.generate([PROMPT], max_new_tokens=NEW, stop_token_ids=[]) == [want]  # none asked for
        assert eng.generate([PROMPT], max_new_tokens=NEW, stop_token_ids=[want[1]]) == [want[:2]]
        rid = eng.add_request(PROMPT, max_new_tokens=NEW)
        got, reasons = [], []
        while eng.has_unfinished():
            for o in eng.step():
                assert o.request_id == rid
                got += o.token_ids
                reasons.append(o.finish_reason)
        assert got == cut and reasons[-1] == "stop"
        with pytest.raises(ConfigError, match="stop_token_ids"):
            eng.add_request(PROMPT, stop_token_ids=5)


def test_scheduler_submit_stops_on_eos_by_default(with_eos):
    path, want, cut, eos = with_eos
    with tidal.Runtime(device="cpu") as rt, tidal.Scheduler(rt) as sched:
        sched.add_model("m", path, block_size=4, kv_cache_bytes=1 << 20)
        default = sched.submit("m", PROMPT, max_new_tokens=NEW)
        none = sched.submit("m", PROMPT, max_new_tokens=NEW, stop_token_ids=[])
        assert default.params.stop_token_ids == eos and none.params.stop_token_ids == ()
        sched.run_until_idle()
        assert default.wait() == cut and default.finish_reason == "stop"
        assert none.wait() == want and none.finish_reason == "length"


# -- the tokenizer -------------------------------------------------------------------------------------------
def test_tokenizer_matches_transformers(tok, hf_tok, smollm2):
    assert tok.eos_token_ids == (2,) == (hf_tok.eos_token_id,) and tok.has_chat_template
    for text in ["Hello world", " leading space", *MULTILINGUAL]:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"] and all(type(i) is int for i in ids)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    ids = tok.chat_prompt(messages)
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ids == hf_tok(rendered, add_special_tokens=False)["input_ids"]
    assert all(type(i) is int for i in ids)
    assert tok.decode(ids) == rendered.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_tokenizer_errors(tok, smollm2, tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer in the checkpoint"):
        Tokenizer.from_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="list of dicts"):
        tok.chat_prompt([])
    with pytest.raises(ConfigError, match="list of dicts"):
        tok.chat_prompt(["hi"])
    with pytest.raises(ConfigError, match="must be a str"):
        tok.encode([1, 2])
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(smollm2)
    bare.chat_template = None
    plain = Tokenizer(bare)
    assert not plain.has_chat_template
    with pytest.raises(ConfigError, match="no chat template"):
        plain.chat_prompt([{"role": "user", "content": "hi"}])


# -- streaming detokenization --------------------------------------------------------------------------------
def stream(tok, ids, rng, prompt_ids=()):
    """Push `ids` in random chunks of 1-3; returns the deltas (the flush last)."""
    d = tok.detokenizer(prompt_ids)
    out, i = [], 0
    while i < len(ids):
        k = rng.randint(1, 3)
        out.append(d.push(ids[i:i + k]))
        i += k
    out.append(d.flush())
    assert d.text == "".join(out)
    return out


def test_detokenizer_random_sequences_equal_whole_decode(tok, hf_tok):
    rng = random.Random(0)
    vocab = len(hf_tok)
    pieces = tok.encode("".join(MULTILINGUAL))
    for case in range(1500):
        n = rng.randint(1, 40)
        kind = case % 3
        if kind == 0:  # anywhere in the vocabulary
            ids = [rng.randrange(vocab) for _ in range(n)]
        elif kind == 1:  # single bytes (split characters) and the special tokens
            ids = [rng.randrange(300) for _ in range(n)]
        else:  # multilingual text with some tokens replaced
            start = rng.randrange(len(pieces))
            ids = [t if rng.random() > 0.2 else rng.randrange(vocab) for t in pieces[start:start + n]]
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))] if case % 2 else ()
        got = "".join(stream(tok, ids, rng, prompt))
        assert got == hf_tok.decode(ids, skip_special_tokens=True), (prompt, ids)


def test_detokenizer_holds_split_characters(tok, hf_tok):
    rng = random.Random(1)
    for text in MULTILINGUAL:
        ids = tok.encode(text)
        d = tok.detokenizer()
        deltas = [d.push([t]) for t in ids] + [d.flush()]
        assert "".join(deltas) == text
        assert not any("\ufffd" in x for x in deltas)  # a split character is held, never shown half
        assert "".join(stream(tok, ids, rng)) == text
    emoji = tok.encode("🙂")
    assert len(emoji) > 1  # the byte-level vocabulary splits it: the first pushes must hold
    d = tok.detokenizer()
    assert [d.push([t]) for t in emoji[:-1]] == [""] * (len(emoji) - 1) and d.push(emoji[-1:]) == "🙂"


def test_detokenizer_on_chat_template_output(tok, hf_tok):
    rng = random.Random(2)
    prompt = tok.chat_prompt([{"role": "user", "content": "Écris un haïku 🌸"}])
    answer = tok.encode("Voici 一 haïku:\n🌸 fleurs 🌸<|im_end|>")  # text of the assistant's turn, EOS last
    assert answer[-1] == 2
    assert "".join(stream(tok, answer, rng, prompt)) == hf_tok.decode(answer, skip_special_tokens=True)
    assert "".join(stream(tok, prompt, rng)) == hf_tok.decode(prompt, skip_special_tokens=True)
    d = IncrementalDetokenizer(tok, prompt)
    assert d.push([2]) == "" and d.flush() == ""  # EOS alone: no text


# -- stop strings --------------------------------------------------------------------------------------------
def run_stops(stops, chunks):
    m = StopMatcher(stops)
    out = []
    for c in chunks:
        text, stopped = m.push(c)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + m.flush(), False


def reference(stops, text):
    """Scanning `text` one character at a time: the text before the first stop string to complete (the
    longest of those completing at the same character), and whether one did."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[:end - max(map(len, done))], True
    return text, False


def test_stop_split_across_pushes():
    m = StopMatcher(["</end>"])
    assert m.push("hello </") == ("hello ", False)
    assert m.push("en") == ("", False)
    assert m.push("d> more") == ("", True)


def test_stop_overlapping_partial_match():
    m = StopMatcher(["abc"])
    assert m.push("aa") == ("a", False)  # the second "a" may start "abc"
    assert m.push("bc") == ("", True)
    assert run_stops(["abc"], ["a", "a", "b", "a", "b", "c"]) == ("aab", True)
    assert run_stops(["aab"], ["a", "a", "a", "b"]) == ("a", True)


def test_several_stops_first_completed_wins():
    assert run_stops(["world", "lo w"], ["hello world"]) == ("hel", True)
    assert run_stops(["b🙂b", "🙂"], ["b🙂b"]) == ("b", True)  # "🙂" completes first, whatever the split
    assert run_stops(["b🙂b", "🙂"], ["b", "🙂", "b"]) == ("b", True)
    assert run_stops(["abc", "c"], ["ab", "c"]) == ("", True)  # both complete at "c": the longer is cut
    assert run_stops(["xyz", "b"], ["a", "xy", "b"]) == ("axy", True)
    m = StopMatcher(["STOP", "ST"])
    assert m.push("aS") == ("a", False)
    assert m.push("T") == ("", True)


def test_stop_at_the_very_start_and_no_stop():
    assert run_stops(["Hi"], ["Hi there"]) == ("", True)
    assert run_stops(["Hi"], ["H", "i"]) == ("", True)
    assert run_stops(["zz"], ["ab", "cz"]) == ("abcz", False)  # the held "z" comes out at the flush
    m = StopMatcher(["zz"])
    assert m.push("abcz") == ("abc", False) and m.flush() == "z"
    assert run_stops([], ["any", "thing"]) == ("anything", False)


def test_stop_matcher_random_against_reference():
    rng = random.Random(3)
    alphabet = "ab🙂\n"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        word = lambda: "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))  # noqa: E731
        stops = [word() for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert run_stops(stops, chunks) == reference(stops, text), (stops, chunks)


def test_stop_matcher_errors():
    with pytest.raises(ConfigError, match="empty"):
        StopMatcher(["ok", ""])
    with pytest.raises(ConfigError, match="list of str"):
        StopMatcher("stop")
    with pytest.raises(ConfigError, match="list of str"):
        StopMatcher([3])
    m = StopMatcher(["x"])
    assert m.push("x") == ("", True)
    with pytest.raises(ConfigError, match="after a stop"):
        m.push("more")
