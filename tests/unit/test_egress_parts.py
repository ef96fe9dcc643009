"""The egress proxy's parts on their own: the allow-list, substitution, redaction, the sandbox CA."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import socket
import ssl
import tempfile
import threading
from pathlib import Path

import pytest

from stockade.egress.allowlist import Allowlist, parse_rule
from stockade.egress.ca import SandboxCA
from stockade.egress.gate import Gate
from stockade.egress.redact import Redactor, StreamRedactor
from stockade.errors import ConfigError, PolicyError
from stockade.policy import Policy


@pytest.mark.parametrize(
    ("rule", "host", "port", "matches"),
    [
        ("api.openai.com", "api.openai.com", 443, True),
        ("API.OpenAI.com.", "api.openai.com", 443, True),
        ("api.openai.com", "evil.openai.com", 443, False),
        ("api.openai.com:443", "api.openai.com", 80, False),
        ("*.example.com", "a.b.example.com", 443, True),
        ("*.example.com", "example.com", 443, False),  # the wildcard is below the domain, not the domain
        ("*.example.com", "evilexample.com", 443, False),
        ("[::1]:8443", "::1", 8443, True),
        ("10.0.0.5", "10.0.0.5", 22, True),
        ("*.0.10", "10.1.0.10", 80, False),  # a name's wildcard never lets an address through
        ("*.example.com", "::ffff:10.0.0.1", 80, False),
        # A name only as a host names it: an escaped dot read as text matched the wildcard, while a
        # resolver takes "x\.co" for one label under .uk (not under .co.uk).
        ("*.co.uk", "x\\.co.uk", 443, False),
        ("*.co.uk", "x.co.uk", 443, True),
        ("*.example.com", "a b.example.com", 443, False),
        ("[0::1]:443", "0:0:0:0:0:0:0:1", 443, True),  # an address in any spelling
    ],
)
def test_rules_match_names_wildcards_addresses_and_ports(rule: str, host: str, port: int, matches: bool) -> None:
    assert (Allowlist([rule]).rule_for(host, port) is not None) == matches


@pytest.mark.parametrize("bad", ["", "a b", "*.com", "foo*.example.com", "x.com:0", "x.com:99999", "[::1", "-a.com"])
def test_malformed_rules_are_refused_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match="allowed host"):
        parse_rule(bad)


@pytest.mark.parametrize("url", ["https://api.openai.com", "http://api.openai.com/", "api.openai.com/v1"])
def test_a_url_given_for_a_host_is_told_so(url: str) -> None:
    # Its scheme was read as the host and "//api..." as the port: "port must be 1-65535".
    with pytest.raises(
        PolicyError, match=r"^invalid policy: allowed host .*: give a host name \('api.openai.com'\), not a URL$"
    ):
        Policy(network_policy="allowlist", allowed_hosts=[url])


def test_only_global_addresses_unless_a_network_or_the_rule_names_them() -> None:
    allowed = Allowlist(["api.example.com", "10.1.2.3"], ["192.168.0.0/16"])
    rule = allowed.rule_for("api.example.com", 443)
    assert rule is not None
    found = [ipaddress.ip_address(a) for a in ("8.8.8.8", "127.0.0.1", "169.254.169.254", "10.0.0.1", "192.168.1.1")]
    assert [str(a) for a in allowed.usable(rule, found)] == ["8.8.8.8", "192.168.1.1"]
    literal = allowed.rule_for("10.1.2.3", 80)
    assert literal is not None and allowed.usable(literal, [ipaddress.ip_address("10.1.2.3")])
    assert allowed.rule_for("192.168.7.7", 80) is not None  # by address, inside a named network
    assert allowed.rule_for("169.254.169.254", 80) is None  # the cloud metadata service: never by default


def test_policy_checks_egress_fields() -> None:
    with pytest.raises(PolicyError, match="allowed_hosts needs network_policy 'allowlist'"):
        Policy(allowed_hosts=["example.com"])
    with pytest.raises(PolicyError, match=r"bound to evil\.com, which allowed_hosts does not allow"):
        Policy(network_policy="allowlist", allowed_hosts=["api.example.com"], secrets=["K@evil.com"])
    with pytest.raises(PolicyError, match="format must hold"):
        Policy(network_policy="allowlist", allowed_hosts=["a.com"],
               secrets=[{"name": "K", "hosts": ["a.com"], "format": "Bearer"}])  # fmt: skip
    with pytest.raises(PolicyError, match="format must hold"):
        Policy(network_policy="allowlist", allowed_hosts=["a.com"],
               secrets=[{"name": "K", "hosts": ["a.com"], "format": "{value}\r\nX-Evil: 1"}])  # fmt: skip
    with pytest.raises(PolicyError, match="is also set in environment"):
        Policy(network_policy="allowlist", allowed_hosts=["a.com"], secrets=["K@a.com"], environment={"K": "v"})
    policy = Policy(network_policy="allowlist", allowed_hosts=["*.example.com"], secrets=["K@api.example.com"])
    assert policy.secrets[0].header == "Authorization" and policy.secrets[0].format == "Bearer {value}"
    # A host bound without a port is reachable on the port its allowed rule names (found by a new
    # user: the port had to be repeated in the binding); one bound to another port is not.
    Policy(network_policy="allowlist", allowed_hosts=["api.local.test:18443"], secrets=["K@api.local.test"])
    with pytest.raises(PolicyError, match=r"bound to api\.local\.test:9999, which allowed_hosts does not allow"):
        Policy(network_policy="allowlist", allowed_hosts=["api.local.test:18443"], secrets=["K@api.local.test:9999"])


def test_substitution_only_in_the_bound_header_for_the_bound_host() -> None:
    policy = Policy(
        network_policy="allowlist",
        allowed_hosts=["api.example.com", "other.example.com"],
        secrets=[{"name": "K", "hosts": ["api.example.com"], "header": "X-Api-Key", "format": "{value}"}],
    )
    gate = Gate(policy, {"K": "the-value"})
    handle = gate.env()["K"]
    headers = [(b"x-api-key", handle.encode()), (b"authorization", f"Bearer {handle}".encode())]
    sent, used = gate.substitute("api.example.com", 443, headers)
    assert sent == [(b"x-api-key", b"the-value"), (b"authorization", f"Bearer {handle}".encode())] and used == ["K"]
    elsewhere, used = gate.substitute("other.example.com", 443, headers)
    assert elsewhere == headers and used == []
    # A header without the handle is left alone: the grant fills the header only where the code put its handle.
    assert gate.substitute("api.example.com", 443, [(b"x-api-key", b"mine")]) == ([(b"x-api-key", b"mine")], [])
    assert "the-value" not in json.dumps(gate.env())


def test_redaction_counts_and_finds_values_split_across_chunks() -> None:
    redactor = Redactor.markers({"A": "secret-aaaa", "B": "secret-aaaa-longer"})
    assert redactor.bytes(b"x secret-aaaa-longer y secret-aaaa") == b"x [REDACTED:B] y [REDACTED:A]"
    assert redactor.take_count() == 2 and redactor.take_count() == 0
    assert redactor.json_text(json.dumps({"v": 'say "secret-aaaa"'})) == json.dumps({"v": 'say "[REDACTED:A]"'})
    stream = StreamRedactor({b"0123456789": b"<handle>"})
    data = b"abc0123456789def0123456789"
    for cut in range(len(data)):
        stream = StreamRedactor({b"0123456789": b"<handle>"})
        out = stream.feed(data[:cut]) + stream.feed(data[cut:]) + stream.flush()
        assert out == b"abc<handle>def<handle>" and stream.count == 2


def test_a_reply_sent_a_byte_at_a_time_is_scanned_in_pieces_and_still_redacted() -> None:
    # Each one-byte piece had every value looked for in all the bytes held back: an upstream that
    # sent its reply a byte at a time cost the egress worker a scan of ~the longest value per byte.
    value = b"v" * 15 + b"-the-secret-value-" + b"w" * 15
    data = (b"x" * 1000 + value) * 20 + b"y" * 77
    stream = StreamRedactor({value: b"<handle>"})
    pieces = [stream.feed(data[i : i + 1]) for i in range(len(data))]
    out = b"".join(pieces) + stream.flush()
    assert out == (b"x" * 1000 + b"<handle>") * 20 + b"y" * 77 and stream.count == 20
    # Each scan took in at least the value's length of new bytes: a few dozen scans, not thousands.
    assert sum(1 for p in pieces if p) <= len(data) // len(value) + 1, sum(1 for p in pieces if p)
    rng = random.Random(7)
    for _ in range(200):  # any cuts, a value whole in what flush is left with included
        stream = StreamRedactor({value: b"<handle>", b"short": b"<s>"})
        sample = rng.choice([b"", b"short", value, b"ab"]) * rng.randint(0, 3) + data[: rng.randint(0, 200)] + value
        cuts = sorted(rng.sample(range(len(sample) + 1), k=min(len(sample) + 1, rng.randint(0, 12))))
        got = b"".join(stream.feed(sample[a:b]) for a, b in zip([0, *cuts], [*cuts, len(sample)], strict=True))
        assert got + stream.flush() == sample.replace(value, b"<handle>").replace(b"short", b"<s>")


def test_a_value_that_holds_another_is_never_taken_for_it_however_the_reply_is_cut() -> None:
    # Half of a value A in hand, a value B it begins with (or holds) was replaced inside it: A no
    # longer matched, and its other half went to the isolate.
    rng = random.Random(11)
    for outer, inner in (
        (b"sk-live-ORG42-7f3a9c1e5b2d4f60", b"sk-live-ORG42"),  # a prefix
        (b"zz-PARTONE-sk-inner-PARTTWO-zz", b"sk-inner"),  # inside
        (b"tok-aaaa-tail", b"aaaa-tail"),  # a suffix
    ):
        values = {outer: b"<A>", inner: b"<B>"}
        for _ in range(150):
            parts = [rng.choice([outer, inner, b"x" * rng.randint(0, 40), outer[: rng.randint(1, len(outer))]])
                     for _ in range(rng.randint(1, 6))]  # fmt: skip
            sample = b"".join(parts)
            one = StreamRedactor(values)
            expected = one.feed(sample) + one.flush()
            assert outer not in expected and inner not in expected
            for size in (1, 2, 3, 5, 8, 13):
                stream = StreamRedactor(values)
                got = b"".join(stream.feed(sample[i : i + size]) for i in range(0, len(sample), size))
                got += stream.flush()
                assert got == expected, (size, sample, got)
                assert stream.count == one.count


def test_a_value_an_echoing_server_escaped_is_taken_out_too() -> None:
    """A value with characters JSON, URLs or HTML escape came back through a header-echo endpoint
    (httpbin's ``/headers``) escaped, past the redaction of its bytes, for the code to unescape."""
    import html
    import urllib.parse

    value = "sk-\"q\\9<Z>&/x y'"
    echoed = [
        json.dumps({"authorization": value}),  # Python, most libraries
        json.dumps({"authorization": value}).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"),
        json.dumps({"authorization": value}).replace("/", "\\/"),  # PHP
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
        html.escape(value),
        f"<b>{html.escape(value, quote=False)}</b>".replace('"', "&#34;").replace("'", "&#39;"),  # Go
        # Found by an attacker's review, each past the redaction before:
        re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), urllib.parse.quote(value, safe="")),  # lower-case hex
        "".join(f"&#x{ord(c):x};" if c in "&<>\"'/" else c for c in value),  # HTML hex entities
        html.escape(value).replace("&#x27;", "&#039;"),  # PHP's htmlspecialchars, ENT_QUOTES
        '{"authorization": "' + "".join(f"\\u{ord(c):04x}" for c in value) + '"}',  # JSON, every character escaped
        value.upper(),  # an echo in capitals
    ]
    redactor = Redactor.markers({"K": value})
    gate = Gate(Policy(network_policy="allowlist", allowed_hosts=["api.example.com"],
                       secrets=[{"name": "K", "hosts": ["api.example.com"]}]), {"K": value})  # fmt: skip
    handle = gate.env()["K"].encode()
    for body in echoed:
        out = redactor.text(body)
        assert "[REDACTED:K]" in out and "sk-" not in out.lower(), (body, out)
        stream = gate.reply_redactor()
        assert stream is not None
        back = stream.feed(body.encode()) + stream.flush()
        assert handle in back and b"sk-" not in back.lower(), (body, back)
        assert gate.redact_reply(body.encode()).count(handle) == 1


def test_the_sandbox_ca_vouches_for_its_hosts_only() -> None:
    ca = SandboxCA("test", ["api.example.com"])
    with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as f:
        f.write(ca.pem)
    try:
        for name, ok in (("api.example.com", True), ("evil.example.org", False)):
            # Even a leaf the CA's own key signed for another name fails: the CA is name-constrained.
            client = ssl.create_default_context(cafile=f.name)
            server_side, client_side = socket.socketpair()
            result: list[object] = []
            context = ca.server_context(name)

            def serve(sock: socket.socket = server_side, context: ssl.SSLContext = context) -> None:
                try:
                    with context.wrap_socket(sock, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass

            thread = threading.Thread(target=serve)
            thread.start()
            try:
                with client.wrap_socket(client_side, server_hostname=name):
                    result.append("verified")
            except ssl.SSLCertVerificationError as exc:
                result.append(exc.verify_message)
            thread.join(10)
            server_side.close()
            assert (result == ["verified"]) == ok, (name, result)
    finally:
        os.unlink(f.name)


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::a9fe:a9fe",
        "::7f00:1",
        "::ffff:10.0.0.1",
        "::ffff:0:a9fe:a9fe",
        "::ffff:0:7f00:1",
        "2002:a9fe:a9fe::1",
        "fec0::1",
        "ff02::1",
        "168.63.129.16",  # Azure's WireServer: public, and the host's own service inside Azure
        "::ffff:168.63.129.16",
        "100.100.100.200",  # Alibaba's metadata, in the shared (carrier NAT) range
    ],
)
def test_an_ipv6_address_carrying_an_inside_address_is_not_public(address: str) -> None:
    allowed = Allowlist(["*.example.com"])
    rule = allowed.rule_for("api.example.com", 443)
    assert rule is not None
    assert allowed.usable(rule, [ipaddress.ip_address(address)]) == []
    assert allowed.usable(rule, [ipaddress.ip_address("2001:4860:4860::8888")])  # a public one is


@pytest.mark.parametrize("value", ["sk-abc\r", "sk abc ", " sk", "sk\tx", "sk\x7fx", "ключ"])
def test_a_secret_value_that_cannot_stand_in_a_header_is_refused_when_stored(value: str, tmp_path: object) -> None:
    from stockade.broker.store import parse_secrets

    with pytest.raises(ConfigError, match="visible ASCII"):
        parse_secrets({"K": value}, "secrets file")
    assert parse_secrets({"K": "sk-live abc"}, "secrets file")["K"].value == "sk-live abc"  # inner spaces: fine


def test_the_vault_keeps_values_encrypted_and_refuses_bad_ones(tmp_path: object) -> None:
    from stockade.broker.vault import Vault

    where = os.path.join(str(tmp_path), "vault")
    vault = Vault(where)
    vault.put("TOKEN", "sk-vault-123456", ["api.example.com"])
    with open(os.path.join(where, "vault"), "rb") as f:
        assert b"sk-vault-123456" not in f.read()
    assert Vault(where).secrets["TOKEN"].value == "sk-vault-123456"  # read back with its key
    with pytest.raises(PolicyError, match="visible ASCII"):
        vault.put("TOKEN", "sk\r\n", ["api.example.com"])
    with pytest.raises(PolicyError, match="environment variable name"):
        vault.put("1BAD", "x", ["api.example.com"])
    with pytest.raises(PolicyError, match="name the hosts"):
        vault.put("TOKEN", "sk-vault-123456", [])
    assert vault.delete("TOKEN") and not Vault(where).secrets


def test_a_vault_secret_registered_before_hosts_were_required_is_bound_to_none(tmp_path: object) -> None:
    # Such an entry (no "hosts") would have gone to any host a caller's policy named.
    from stockade.broker.store import SecretStore, parse_secrets
    from stockade.broker.vault import Vault

    where = os.path.join(str(tmp_path), "vault")
    vault = Vault(where)
    vault.put("OLD", "sk-old-123456", ["api.example.com"])
    with open(os.path.join(where, "vault"), "wb") as f:  # as an older broker wrote it
        f.write(vault._fernet.encrypt(json.dumps({"OLD": {"value": "sk-old-123456"}}).encode()))
    store = SecretStore({})
    store.vault = Vault(where)
    assert store.hosts_of("OLD") == ()
    with pytest.raises(PolicyError, match=r"may be bound to no host.*secrets put OLD --host"):
        store.check_grant("OLD", ["attacker.example"], hostless=True)
    Vault(where).put("OLD", "sk-old-123456", ["api.example.com"])  # registered again, with its hosts
    store.vault = Vault(where)
    assert store.check_grant("OLD", ["api.example.com"]).value == "sk-old-123456"
    # A secrets file's entry of no hosts is refused too, naming where it stands (put cannot mend it).
    with pytest.raises(PolicyError, match="its entry in the broker's secrets file names none"):
        SecretStore(parse_secrets({"F": {"value": "sk-file-1", "hosts": []}}, "secrets file")).check_grant(
            "F", ["a.b"], hostless=True
        )


def test_cbor_frames_come_whole_however_they_are_cut_and_an_oversized_one_is_skipped() -> None:
    from stockade.broker import wire
    from stockade.rpc.codec import TOO_LARGE

    codec = wire.CborFrames(b"k" * 32)
    first, second = wire.frame({"id": 1}, codec.key), wire.frame({"id": 2}, codec.key)
    stream = first + second
    for cut in range(len(stream)):
        framer = codec.framer(1024)
        frames = framer.feed(stream[:cut], 64) + framer.feed(stream[cut:], 64)
        assert [codec.decode(f)["id"] for f in frames if f is not None] == [1, 2]
    framer = codec.framer(16)
    huge = (1000).to_bytes(4, "big") + b"x" * 1000
    assert framer.feed(huge[:500], 64) == [TOO_LARGE] and framer.feed(huge[500:] + first[:0], 64) == []
    framer = codec.framer(1024)
    assert framer.single(first) == first[4:] and framer.single(first + second) is None
    assert framer.feed(first[:7], 64) == [] and framer.end() == []  # a frame cut short by the end is no request


def test_a_read_of_tiny_frames_is_split_only_as_far_as_the_reader_has_room() -> None:
    # 256 KiB of "1\n" (or of one-byte CBOR frames) became ~87,000 objects at once, queued before
    # the bound on a connection's queue could pause its reading: 60 connections, +170 MB.
    from stockade.broker import wire
    from stockade.rpc.codec import TOO_LARGE, JsonLines

    for framer, one, size in (
        (JsonLines().framer(16), b"1\n", 2),
        (wire.CborFrames(b"k" * 32).framer(16), b"\0\0\0\x011", 5),
    ):
        flood = one * ((256 << 10) // size)
        assert framer.feed(flood, 64) == [b"1"] * 64 and framer.pending and framer.buffered == 0
        taken = 64
        while framer.pending:
            got = framer.feed(b"", 64)
            assert 0 < len(got) <= 64
            taken += len(got)
        assert taken == len(flood) // size and framer.end() == []
    lines = JsonLines().framer(16)
    assert lines.feed(b"1\n2\n" + b"x" * 40, 1) == [b"1"] and lines.pending and lines.buffered == 40
    assert lines.feed(b"", 8) == [b"2", TOO_LARGE] and not lines.pending  # the line over the limit, then
    assert lines.feed(b"yy\n3\n\n\n4", 8) == [b"3"] and lines.end() == [b"4"]  # its tail skipped; blanks none


def test_a_secret_stored_with_no_hosts_is_granted_only_where_one_caller_may_grant_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The broker (and a daemon) serve many callers: each could bind it to a server of its own.
    from stockade.broker.store import SecretStore, parse_secrets

    store = SecretStore(parse_secrets({"ANY": "sk-any-123456"}, "secrets file"))
    with pytest.raises(PolicyError, match=r"secret ANY is not granted for attacker\.example"):
        store.check_grant("ANY", ["attacker.example"])
    assert re.search(r'names no hosts it may be sent to.*"ANY": \{"value"', caplog.text)  # said to the admin
    assert store.check_grant("ANY", ["attacker.example"], hostless=True).value == "sk-any-123456"  # a library's


def test_many_callers_learn_neither_which_secrets_exist_nor_their_hosts() -> None:
    # secrets.list is an admin's: a refusal told any caller both, one guess at a time.
    from stockade.broker.store import SecretStore, parse_secrets

    store = SecretStore(parse_secrets({"PAYROLL": {"value": "sk-pay-1", "hosts": ["payroll.corp"]}}, "secrets file"))
    said = []
    for name in ("PAYROLL", "NO_SUCH"):
        with pytest.raises(PolicyError) as refused:
            store.check_grant(name, ["x.example.com"])
        said.append(str(refused.value).replace(name, "NAME"))
    assert said[0] == said[1] and "payroll.corp" not in said[0], said
    assert store.check_grant("PAYROLL", ["payroll.corp"]).value == "sk-pay-1"


def test_a_dns_query_dropped_unanswered_is_counted() -> None:
    """Too big, past the queries answered at once, or not DNS at all: dropped as a busy server
    would, and before, counted nowhere: the run's egress_requests_dropped said nothing of them."""
    import asyncio

    from stockade.egress import dns

    gate = Gate(Policy(network_policy="allowlist", allowed_hosts=["api.example.com"]), {})

    async def never(name: str) -> list[object]:
        raise AssertionError("nothing here is looked up")

    service = dns.NameService(gate, never)
    service.datagram_received(b"\0" * (dns.MAX_QUERY_BYTES + 1), ("127.0.0.1", 5353))
    asyncio.run(service._answer(b"not a query", ("127.0.0.1", 5353)))
    service.pending = {object() for _ in range(dns.MAX_PENDING)}  # type: ignore[misc]
    service.datagram_received(b"\0" * 20, ("127.0.0.1", 5353))
    assert gate.take_records() == ([], 3)


def test_a_dns_response_sent_as_a_query_is_dropped_and_an_escaped_name_refused() -> None:
    import asyncio

    import dns.message
    import dns.rcode

    from stockade.egress import dns as name_service

    gate = Gate(Policy(network_policy="allowlist", allowed_hosts=["*.co.uk"]), {})
    looked_up: list[str] = []

    async def resolve(name: str) -> list[object]:
        looked_up.append(name)
        return []

    service = name_service.NameService(gate, resolve)
    answered: list[bytes] = []
    service.transport = type("T", (), {"sendto": lambda self, data, addr: answered.append(data)})()  # type: ignore[assignment]
    response = dns.message.make_response(dns.message.make_query("x.co.uk", "A"))
    asyncio.run(service._answer(response.to_wire(), ("127.0.0.1", 5353)))  # raised in its task, unanswered
    assert answered == [] and gate.take_records() == ([], 1)
    asyncio.run(service._answer(dns.message.make_query("x\\.co.uk", "A").to_wire(), ("127.0.0.1", 5353)))
    assert looked_up == [] and dns.message.from_wire(answered[0]).rcode() == dns.rcode.REFUSED
    (refused,), _ = gate.take_records()
    assert not refused.allowed


def test_a_scoped_ipv6_address_is_no_host_the_policy_names() -> None:
    # "fe80::1%eth0" passed for fe80::1 in a named network: the caller chose the interface.
    allowlist = Allowlist([], ["fe80::/10"])
    assert allowlist.rule_for("fe80::1", 80) is not None
    assert allowlist.rule_for("fe80::1%eth0", 80) is None


def test_a_flow_taken_open_is_said_to_close_even_when_it_moved_nothing_more() -> None:
    from stockade.egress.gate import Flow
    from stockade.result import EgressRequest

    flow = Flow(EgressRequest(host="h.test", port=443, method="CONNECT", scheme="tunnel", allowed=True))
    flow.record.bytes_sent = 100
    first = flow.take(closing=False)
    assert first is not None and (first.bytes_sent, first.open) == (100, True)
    assert flow.take(closing=False) is None  # a run in which it moved nothing: nothing to say
    last = flow.take(closing=True)  # closed idle: before, nothing said it ever closed
    assert last is not None and (last.bytes_sent, last.bytes_received, last.open) == (0, 0, False)
    assert flow.take(closing=True) is None


def test_a_value_that_is_another_ones_escaped_form_stands_for_itself() -> None:
    # "a%2Fb" is "a/b" percent-encoded, and a secret of its own: before, whichever came last won,
    # and a reply holding one came back with the other's handle.
    redactor = Redactor.markers({"SLASH": "sk-a/b", "ESCAPED": "sk-a%2Fb"})
    assert redactor.text("sk-a%2Fb sk-a/b") == "[REDACTED:ESCAPED] [REDACTED:SLASH]"
    redactor = Redactor.markers({"ESCAPED": "sk-a%2Fb", "SLASH": "sk-a/b"})
    assert redactor.text("sk-a%2Fb sk-a/b") == "[REDACTED:ESCAPED] [REDACTED:SLASH]"


def test_a_process_serving_callers_takes_unset_egress_networks_as_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from stockade import settings

    monkeypatch.setattr(settings, "_serving", False)
    monkeypatch.delenv("STOCKADE_EGRESS_NETWORKS", raising=False)
    assert settings.egress_networks(settings.current()) is None  # a library's one caller: any
    settings.serve_callers()
    assert settings.serving_callers() and settings.egress_networks(settings.current()) == ()
    monkeypatch.setenv("STOCKADE_EGRESS_NETWORKS", "10.0.0.0/8")
    assert settings.egress_networks(settings.current()) == ("10.0.0.0/8",)


def test_a_ray_node_whose_egress_networks_hold_the_cluster_does_not_start() -> None:
    from stockade.placement.ray_node import refuse_cluster_networks

    cluster = ["10.0.0.5", "10.0.0.2:6379"]
    refuse_cluster_networks(None, cluster)
    refuse_cluster_networks((), cluster)
    refuse_cluster_networks(("192.168.0.0/16",), cluster)
    with pytest.raises(ConfigError, match=r"holds 10\.0\.0\.0/24, where this Ray cluster.s 10\.0\.0\.5"):
        refuse_cluster_networks(("10.0.0.0/24",), cluster)
    with pytest.raises(ConfigError, match=r"cluster's 10\.0\.0\.2 is"):
        refuse_cluster_networks(("10.0.0.2/32",), ["192.168.1.1", "10.0.0.2:6379"])
    with pytest.raises(ConfigError, match=r"cluster's ::1 is"):
        refuse_cluster_networks(("::1/128",), ["[::1]:6379"])
    # A GCS given by name, as Ray keeps it (ray-head:6379): resolved, not skipped.
    with pytest.raises(ConfigError, match=r"cluster's 127\.0\.0\.1 is"):
        refuse_cluster_networks(("127.0.0.0/8",), ["192.168.1.1", "localhost:6379"])
    refuse_cluster_networks(("127.0.0.0/8",), ["no-such-host.invalid:6379"])  # unresolved: nothing to hold


def test_a_host_without_ipv6_holds_no_ipv6_address_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel booted with ipv6.disable=1 refuses an AF_INET6 socket: every name with an AAAA record
    made the proxy's address check raise instead of going on with its IPv4 addresses."""
    from stockade.egress import allowlist

    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: object, **kwargs: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(allowlist.socket, "socket", no_ipv6)
    rule = parse_rule("example.com")
    found = [ipaddress.ip_address("2606:4700::1"), ipaddress.ip_address("1.1.1.1")]
    assert Allowlist(["example.com"]).usable(rule, found) == found


def test_a_secrets_file_that_is_not_json_is_refused_with_the_shape_it_should_have(tmp_path: object) -> None:
    # A .env-style file is the usual mistake: the error shows the shape, and none of the file's bytes.
    from stockade.broker.store import SecretStore

    path = os.path.join(str(tmp_path), "secrets")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write("OPENAI_API_KEY=sk-live-0123456789\n")
    with pytest.raises(ConfigError) as caught:
        SecretStore.load(path)
    assert "is not JSON" in str(caught.value)
    assert '{"NAME": {"value": "...", "hosts": ["api.example.com"]}}' in str(caught.value)
    assert "sk-live" not in str(caught.value)


def test_a_wildcard_secret_may_be_bound_to_its_own_wildcard_and_names_below_it_only() -> None:
    from stockade.broker.store import SecretStore, parse_secrets

    store = SecretStore(parse_secrets({"W": {"value": "sk-wild-1", "hosts": ["*.stockade.test"]}}, "secrets file"))
    for within in ("*.stockade.test", "api.stockade.test", "*.a.stockade.test"):
        assert store.check_grant("W", [within]).value == "sk-wild-1", within
    for beyond in ("stockade.test", "*.other.test", "evilstockade.test", "*.evilstockade.test"):
        with pytest.raises(PolicyError, match="is not granted for"):
            store.check_grant("W", [beyond])


def test_a_request_sent_back_to_the_broker_client_is_no_answer(tmp_path: Path) -> None:
    # Requests and answers are signed with one key: a socket that reflects a request gave the
    # client an answer with its own id and an empty result.
    from stockade.broker import wire
    from stockade.broker.client import BrokerClient

    path = str(tmp_path / "broker.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def reflect() -> None:
        conn, _ = listener.accept()
        with conn:
            header = conn.recv(4, socket.MSG_WAITALL)
            conn.sendall(header + conn.recv(wire.length_of(header), socket.MSG_WAITALL))

    thread = threading.Thread(target=reflect, daemon=True)
    thread.start()
    try:
        with pytest.raises(ConfigError, match="sent a request back, not an answer"):
            BrokerClient(path, b"k" * 32).call("ping", {})
    finally:
        thread.join(10)
        listener.close()
