"""Why a broker connection fails, and when that is worth a log line: the cause classifier and
the once-per-change rule of ``deltafleet.shared.connection`` (no broker)."""

from __future__ import annotations

import errno
import logging
import socket
import ssl

import pytest

from deltafleet.shared.connection import (
    Cause,
    ConnectionTracker,
    Failure,
    classify_connack,
    classify_error,
)


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    e = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    e.verify_code, e.verify_message = code, message
    return e


def _ssl_error(reason: str) -> ssl.SSLError:
    e = ssl.SSLError(1, f"[SSL: {reason.upper()}] {reason}")
    e.reason = reason.upper()
    return e


@pytest.mark.parametrize(("exc", "cause"), [
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), Cause.REFUSED),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), Cause.NAME_NOT_FOUND),
    (TimeoutError("timed out"), Cause.TIMEOUT),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), Cause.UNREACHABLE),
    (OSError(errno.EHOSTUNREACH, "No route to host"), Cause.UNREACHABLE),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), Cause.CLOSED),
    (_verify_error(20, "unable to get local issuer certificate"), Cause.TLS_VERIFY),
    (_verify_error(10, "certificate has expired"), Cause.TLS_VERIFY),
    (_verify_error(62, "Hostname mismatch, certificate is not valid for 'x'"), Cause.TLS_HOSTNAME),
    (ssl.CertificateError("hostname 'x' doesn't match 'y'"), Cause.TLS_HOSTNAME),
    (_ssl_error("wrong_version_number"), Cause.TLS),
    (_ssl_error("tlsv13_alert_certificate_required"), Cause.TLS),
    (OSError(errno.EACCES, "Permission denied"), Cause.OTHER),
    (ValueError("Invalid host."), Cause.OTHER),
])
def test_an_attempt_error_is_classified_by_its_cause(exc: BaseException, cause: Cause) -> None:
    failure = classify_error(exc)
    assert failure.cause is cause
    assert str(failure).startswith(str(cause))
    assert not failure.final


def test_a_tls_failure_keeps_the_reason_and_names_tls() -> None:
    failure = classify_error(_verify_error(20, "unable to get local issuer certificate"))
    assert str(failure) == ("TLS failure: certificate verify failed "
                            "(unable to get local issuer certificate)")
    assert "TLS" in str(classify_error(_ssl_error("wrong_version_number")))


@pytest.mark.parametrize(("code", "cause", "final"), [
    (4, Cause.BAD_CREDENTIALS, True), (0x86, Cause.BAD_CREDENTIALS, True),
    (0x8C, Cause.BAD_CREDENTIALS, True),
    (5, Cause.NOT_AUTHORISED, True), (0x87, Cause.NOT_AUTHORISED, True),
    (0x8A, Cause.NOT_AUTHORISED, True),
    (1, Cause.PROTOCOL, False), (0x84, Cause.PROTOCOL, False),
    (2, Cause.CLIENT_ID, False), (0x85, Cause.CLIENT_ID, False),
    (3, Cause.BROKER_UNAVAILABLE, False), (0x88, Cause.BROKER_UNAVAILABLE, False),
    (0x89, Cause.BROKER_UNAVAILABLE, False), (0x9F, Cause.BROKER_UNAVAILABLE, False),
    (0x80, Cause.BROKER_REFUSED, False), (0x9D, Cause.BROKER_REFUSED, False),
])
def test_a_refusing_connack_is_classified_and_only_auth_is_final(code: int, cause: Cause,
                                                                 final: bool) -> None:
    failure = classify_connack(code, "Some reason")
    assert (failure.cause, failure.final) == (cause, final)


def test_an_unknown_connack_keeps_the_brokers_reason() -> None:
    assert str(classify_connack(0x9D, "Server moved")) == \
        "broker refused the connection (Server moved)"


def _tracker() -> ConnectionTracker:
    return ConnectionTracker("mqtt://10.0.0.5:1883", "10.0.0.5:1883", 1, 30)


REFUSED = Failure(Cause.REFUSED)
TLS = Failure(Cause.TLS_VERIFY, "unable to get local issuer certificate")


def test_repeated_failures_of_one_cause_log_once_with_the_backoff() -> None:
    t = _tracker()
    lines = [t.failed(REFUSED, 100.0 + i) for i in range(8)]
    assert lines[0] == (logging.WARNING, "broker 10.0.0.5:1883 unreachable: connection refused; "
                                         "retrying in 1 s, backing off to every 30 s")
    assert lines[1:] == [None] * 7
    assert t.state.attempts == 8
    assert t.state.retry_s == 30
    assert t.state.since == 100.0
    assert not t.state.connected


def test_a_change_of_cause_is_logged_once_at_the_backoff_in_use() -> None:
    t = _tracker()
    for i in range(6):
        t.failed(REFUSED, float(i))
    line = t.failed(TLS, 10.0)
    assert line == (logging.WARNING,
                    "broker 10.0.0.5:1883 connection failed: TLS failure: certificate verify "
                    "failed (unable to get local issuer certificate); retrying every 30 s")
    assert t.failed(TLS, 11.0) is None
    assert t.state.failure == TLS
    assert t.state.since == 0.0  # down since the first failure


def test_recovery_is_logged_once_and_keeps_the_last_cause() -> None:
    t = _tracker()
    t.failed(REFUSED, 1.0)
    t.failed(REFUSED, 2.0)
    assert t.connected(5.0) == (logging.INFO,
                                "connected to broker 10.0.0.5:1883 after 2 failed attempts")
    assert t.connected(6.0) is None
    st = t.state
    assert (st.connected, st.since, st.attempts, st.retry_s) == (True, 5.0, 0, None)
    assert st.to_dict()["cause"] == "connection refused"


def test_the_first_connect_is_logged_and_a_loss_then_the_same_cause_again() -> None:
    t = _tracker()
    assert t.connected(1.0) == (logging.INFO, "connected to broker 10.0.0.5:1883")
    assert t.lost(Failure(Cause.LOST), 2.0) is not None
    assert t.lost(Failure(Cause.LOST), 2.5) is None
    # the cause before the connect was refused as well: after a loss it is news again
    t2 = _tracker()
    t2.failed(REFUSED, 0.0)
    t2.connected(1.0)
    t2.lost(Failure(Cause.LOST), 2.0)
    line = t2.failed(REFUSED, 3.0)
    assert line is not None and "connection refused" in line[1]
    assert t2.state.attempts == 1 and t2.state.since == 2.0


def test_an_auth_refusal_is_final_and_says_so() -> None:
    t = _tracker()
    level, text = t.failed(Failure(Cause.NOT_AUTHORISED), 1.0) or (0, "")
    assert level == logging.ERROR
    assert "auth refused: not authorised" in text and "not retrying" in text
    assert t.state.final and t.state.retry_s is None
    assert t.state.to_dict() == {
        "url": "mqtt://10.0.0.5:1883", "connected": False, "since": 1.0,
        "cause": "auth refused: not authorised", "error": "auth refused: not authorised",
        "attempts": 1, "retry_s": None, "final": True}
