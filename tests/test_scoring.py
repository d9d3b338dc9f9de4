"""Scorers: profanity-check on real sentences, Perspective against a real loopback HTTP server."""

import json
import socket
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from destein_lens.errors import DesteinError
from destein_lens.scoring import get_scorer

TOXIC = ["you are a fucking idiot", "shut up, you stupid bitch", "this is bullshit, asshole"]
CLEAN = [
    "what a lovely day for a walk",
    "I like trains and the weather is nice",
    "thank you for your help",
]


def test_profanity_check_scores_toxic_sentences_far_above_clean_ones():
    scorer = get_scorer("profanity-check")
    assert scorer.name == "profanity-check"
    toxic, clean = scorer.score(TOXIC), scorer.score(CLEAN)
    assert all(0.0 <= s <= 1.0 for s in toxic + clean)
    assert min(toxic) > 0.8 > 0.2 > max(clean)


def test_profanity_check_handles_empty_strings_and_batches():
    scores = get_scorer("profanity-check", batch_size=2).score(["", *TOXIC, ""])
    assert len(scores) == 5
    assert scores[0] == scores[-1] < 0.5
    assert get_scorer("profanity-check").score([]) == []


def test_unknown_scorer_lists_the_known_ones():
    with pytest.raises(DesteinError, match=r"profanity-check.*perspective"):
        get_scorer("perspectiv")


def test_unknown_option_is_a_user_error():
    with pytest.raises(DesteinError, match="no option colour"):
        get_scorer("profanity-check", colour="red")


class FakePerspective:
    """A loopback server speaking the ``comments:analyze`` JSON; scores a text by its length."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.paths: list[str] = []
        self.keys: list[str | None] = []  # the X-Goog-Api-Key header of each request, GETs included
        self.statuses: deque[int] = deque()  # answered first, one per request
        self.default_status = 200
        self.echo_key = False  # quote the received key in error messages, as a careless server might
        self.redirect: str | None = None  # answer every POST with a 302 to this URL
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.paths.append(self.path)
                fake.keys.append(self.headers.get("X-Goog-Api-Key"))
                status = fake.statuses.popleft() if fake.statuses else fake.default_status
                if fake.redirect:
                    self.send(302, {}, Location=fake.redirect)
                elif status == 200:
                    value = len(body["comment"]["text"]) / 100
                    self.send(status, {"attributeScores": {"TOXICITY": {"summaryScore": {"value": value}}}})
                else:
                    self.fail(status)

            def do_GET(self) -> None:  # where a followed redirect lands
                fake.paths.append(self.path)
                fake.keys.append(self.headers.get("X-Goog-Api-Key"))
                self.fail(405)

            def fail(self, status: int) -> None:
                echo = f" for key {self.headers.get('X-Goog-Api-Key')}" if fake.echo_key else ""
                self.send(status, {"error": {"code": status, "message": f"fake failure {status}{echo}"}})

            def send(self, status: int, payload: dict, **headers: str) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1alpha1/comments:analyze"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    server = FakePerspective()
    yield server
    server.close()


@pytest.fixture
def perspective(api, tmp_path, monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_URL", raising=False)
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")

    def make(**options):
        options = {
            "url": api.url,
            "cache_dir": tmp_path,
            "qps": 1000.0,
            "backoff_s": 0.001,
            **options,
        }
        return get_scorer("perspective", **options)

    return make


def test_perspective_sends_the_api_request_and_parses_scores(api, perspective):
    scorer = perspective()
    assert scorer.name == "perspective"
    assert scorer.score(["abc", "abcdefghij"]) == pytest.approx([0.03, 0.10])
    assert api.requests[0] == {
        "comment": {"text": "abc"},
        "languages": ["en"],
        "requestedAttributes": {"TOXICITY": {}},
    }
    assert api.paths == ["/v1alpha1/comments:analyze"] * 2  # the key is not in the URL...
    assert api.keys == ["test-key"] * 2  # ...but in the header Google's APIs read it from


def test_perspective_takes_url_and_cache_from_environment(api, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    monkeypatch.setenv("PERSPECTIVE_API_URL", api.url)
    monkeypatch.setenv("DESTEIN_LENS_CACHE", str(tmp_path))
    assert get_scorer("perspective", qps=1000.0).score(["abcd"]) == pytest.approx([0.04])
    assert len(api.requests) == 1
    assert (tmp_path / "perspective").is_dir()


def test_perspective_cache_means_a_text_is_sent_once(api, perspective):
    first = perspective().score(["abc", "de", "abc"])
    assert len(api.requests) == 2
    assert perspective().score(["de", "abc"]) == [first[1], first[0]]  # a fresh scorer, same cache
    assert len(api.requests) == 2


def test_perspective_blank_text_scores_zero_without_a_request(api, perspective):
    assert perspective().score(["", "  \n"]) == [0.0, 0.0]
    assert api.requests == []


def test_perspective_retries_after_429(api, perspective):
    api.statuses.extend([429, 503])
    assert perspective().score(["abcde"]) == pytest.approx([0.05])
    assert len(api.requests) == 3


def test_perspective_gives_up_after_bounded_retries_on_500(api, perspective):
    api.default_status = 500
    with pytest.raises(DesteinError, match=r"failed 3 times.*HTTP 500"):
        perspective(max_retries=2).score(["abc"])
    assert len(api.requests) == 3


def test_perspective_does_not_retry_a_rejected_request(api, perspective):
    api.statuses.append(400)
    with pytest.raises(DesteinError, match="HTTP 400: fake failure 400"):
        perspective().score(["abc"])
    assert len(api.requests) == 1


def test_perspective_retries_connection_errors_then_gives_up(perspective):
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    scorer = perspective(url=f"http://127.0.0.1:{port}/", max_retries=1)
    with pytest.raises(DesteinError, match="failed 2 times"):
        scorer.score(["abc"])


def test_perspective_spaces_requests_to_the_rate_limit(api, perspective):
    scorer = perspective(qps=20.0)
    start = time.monotonic()
    scorer.score(["a", "b", "c"])
    assert time.monotonic() - start >= 2 / 20


def test_perspective_without_api_key_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(DesteinError, match="PERSPECTIVE_API_KEY"):
        get_scorer("perspective", cache_dir=tmp_path)


KEY = "sekret-KEY-4711"


@pytest.fixture
def keyed(perspective, monkeypatch):
    """`perspective` with a key that cannot turn up by chance in a message."""
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    return perspective


def test_perspective_repr_has_no_key(keyed):
    assert KEY not in repr(keyed()) and KEY not in str(keyed())


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "LocalHost", "[::1]"])
def test_perspective_allows_plain_http_only_to_this_machine(keyed, host):
    assert keyed(url=f"http://{host}:1/v1alpha1/comments:analyze").url.startswith("http://")


@pytest.mark.parametrize("url", ["http://example.com/x", "http://10.0.0.1:8080/", "http://127.0.0.1.nip.io/"])
def test_perspective_refuses_plain_http_to_other_hosts(keyed, url):
    with pytest.raises(DesteinError, match=r"must be https://.*not http://") as err:
        keyed(url=url)
    assert KEY not in str(err.value)


@pytest.mark.parametrize(
    "url",
    [f"http://[::1/?key={KEY}", f"https://?key={KEY}", f"ftp://h.com/?key={KEY}", KEY, "https://h:99999/"],
)
def test_perspective_malformed_url_is_one_line_without_the_key(keyed, url):
    with pytest.raises(DesteinError, match="not an http\\(s\\) URL with a host") as err:
        keyed(url=url)
    assert KEY not in str(err.value) and err.value.__cause__ is None


@pytest.mark.parametrize("key", ["two words", "line\nbreak", "caf\u00e9"])
def test_perspective_refuses_a_key_that_cannot_be_a_header(perspective, monkeypatch, key):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", key)
    with pytest.raises(DesteinError, match="printable ASCII") as err:
        perspective()
    assert key not in str(err.value)


@pytest.mark.parametrize(
    ("status", "message"), [(400, "HTTP 400: fake failure 400 for key <api key>"), (500, "failed 2 times")]
)
def test_perspective_errors_never_show_the_key(api, keyed, status, message):
    api.default_status, api.echo_key = status, True
    with pytest.raises(DesteinError) as err:
        keyed(max_retries=1).score(["abc"])
    assert message in str(err.value) and KEY not in str(err.value)
    assert api.keys[0] == KEY  # the server did see it


def test_perspective_connection_error_does_not_show_the_key(keyed):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DesteinError, match="failed 1 times") as err:
        keyed(url=f"http://127.0.0.1:{port}/", max_retries=0).score(["abc"])
    assert KEY not in str(err.value)


def test_perspective_key_does_not_follow_a_redirect(api, keyed):
    elsewhere = FakePerspective()
    try:
        api.redirect = elsewhere.url
        with pytest.raises(DesteinError, match="HTTP 405") as err:
            keyed().score(["abc"])
    finally:
        elsewhere.close()
    assert api.keys == [KEY] and elsewhere.keys == [None]
    assert KEY not in str(err.value)


def test_detoxify_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "detoxify", None)  # makes `import detoxify` fail
    with pytest.raises(DesteinError, match="pip install"):
        get_scorer("detoxify-original")


def test_detoxify_unknown_variant_is_a_user_error():
    with pytest.raises(DesteinError, match="original, unbiased"):
        get_scorer("detoxify", variant="multilingual-huge")


def test_detoxify_missing_checkpoint_says_how_to_provide_one(monkeypatch, tmp_path):
    pytest.importorskip("detoxify")
    monkeypatch.setenv("DESTEIN_LENS_DETOXIFY_CHECKPOINT", str(tmp_path / "absent.ckpt"))
    with pytest.raises(DesteinError, match="DESTEIN_LENS_DETOXIFY_CHECKPOINT"):
        get_scorer("detoxify-unbiased")


def test_detoxify_failed_download_says_how_to_provide_a_checkpoint(api, monkeypatch, tmp_path):
    detoxify = pytest.importorskip("detoxify.detoxify")
    api.default_status = 404  # the "release" is missing, as it is for any offline machine
    monkeypatch.setitem(detoxify.MODEL_URLS, "original", f"{api.url.rsplit('/', 2)[0]}/toxic.ckpt")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("DESTEIN_LENS_DETOXIFY_CHECKPOINT", raising=False)
    with pytest.raises(DesteinError, match="checkpoint=PATH"):
        get_scorer("detoxify-original")


def test_detoxify_scores_with_a_local_checkpoint(tmp_path):
    pytest.importorskip("detoxify")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    # A tiny untrained BERT in Detoxify's checkpoint format, so nothing is downloaded.
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "nice"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=32,
        num_labels=6,
    )
    config.save_pretrained(tmp_path)
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    classes = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
    arch = {
        "model_type": str(tmp_path),
        "model_name": "BertForSequenceClassification",
        "tokenizer_name": "BertTokenizer",
        "num_classes": 6,
    }
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save(
        {
            "config": {"arch": {"args": arch}, "dataset": {"args": {"classes": classes}}},
            "state_dict": transformers.BertForSequenceClassification(config).state_dict(),
        },
        checkpoint,
    )
    scorer = get_scorer("detoxify-unbiased", checkpoint=str(checkpoint), batch_size=2)
    assert scorer.name == "detoxify-unbiased"
    scores = scorer.score(["you are nice", "", "nice"])  # the last batch holds a single text
    assert len(scores) == 3
    assert all(0.0 <= s <= 1.0 for s in scores)
