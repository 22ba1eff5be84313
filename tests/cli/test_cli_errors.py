"""The `cnei` command line's answers to mistyped flags and addresses, and the healthcheck's to
missing TLS files: one readable line and an exit code, never a traceback."""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.cli import healthcheck, infra, status
from services.cli import main as cli


class _Status(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200 if self.path == "/api/status" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def status_server():
    server = ThreadingHTTPServer(("127.0.0.1", infra.free_port()), _Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize("scheme", ["", "http://"])
def test_the_status_url_may_be_given_as_host_port_or_with_http(status_server, scheme):
    assert status.fetch_status(scheme + status_server) == {"path": "/api/status"}


class _RestrictedStatus(_Status):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.headers.get("stats-key") == "s":
            return super().do_GET()
        body = json.dumps({"error": "the statistics API is restricted: send header 'stats-key' with its value"})
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())


def test_cnei_status_sends_its_headers_and_a_refusal_names_the_header_it_needs(capsys):
    server = ThreadingHTTPServer(("127.0.0.1", infra.free_port()), _RestrictedStatus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"127.0.0.1:{server.server_address[1]}"
    try:
        assert status.fetch_status(url, headers=[("stats-key", "s")]) == {"path": "/api/status"}
        assert cli.main(["status", "--url", url]) == 2
        err = capsys.readouterr().err
        assert "PERMISSION_DENIED" in err and "send header 'stats-key'" in err and "not reachable" not in err
    finally:
        server.shutdown()
        server.server_close()


def test_train_start_with_zero_rounds_is_refused(capsys):
    assert cli.main(["train", "start", "--rounds", "0", "--trainer", f"127.0.0.1:{infra.free_port()}"]) == 2
    assert "error (INVALID_ARGUMENT): --rounds must be at least 1, not 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["infer", "digits", "--param", "oops"], ["models", "push", "m.onnx", "--name", "m",
                                                                        "--version", "1", "--meta", "=1"]])
def test_a_malformed_key_value_flag_is_refused_by_name_before_any_server_is_called(argv, capsys):
    server = ["--url" if argv[0] == "infer" else "--registry", f"127.0.0.1:{infra.free_port()}"]
    assert cli.main([*argv, *server]) == 2
    assert f"error (INVALID_ARGUMENT): --{argv[-2].lstrip('-')} needs KEY=VALUE, not '{argv[-1]}'" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "count", "says"), [
    ("--digits", "-3", "--digits must be from 1 to 1797 (the load_digits images), not -3"),
    ("--digits", "0", "--digits must be from 1 to 1797 (the load_digits images), not 0"),
    ("--digits", "5000", "--digits must be from 1 to 1797 (the load_digits images), not 5000"),
    ("--batch", "-2", "--batch must be at least 1, not -2"),
])
def test_a_row_count_that_is_none_or_too_many_is_refused_by_name_before_any_server_is_called(flag, count, says,
                                                                                          capsys):
    assert cli.main(["infer", "digits", flag, count, "--url", f"127.0.0.1:{infra.free_port()}"]) == 2
    assert f"error (INVALID_ARGUMENT): {says}" in capsys.readouterr().err


def test_a_status_url_that_answers_no_http_is_not_reachable_rather_than_its_bytes_printed():
    with socket.create_server(("127.0.0.1", 0)) as listener:  # answers every connection with gRPC-like bytes
        def answer():
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00")
        threading.Thread(target=answer, daemon=True).start()
        assert status.fetch_status(f"127.0.0.1:{listener.getsockname()[1]}") is None


def test_the_healthcheck_names_a_missing_tls_file_and_exits_1(tmp_path, capsys):
    missing = tmp_path / "missing.pem"
    assert healthcheck.main([f"127.0.0.1:{infra.free_port()}", "--tls-ca", str(missing)]) == 1
    assert f"cannot use the TLS files: [Errno 2] No such file or directory: '{missing}'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "setting", "says"), [
    (["models", "list"], "CNEI_REGISTRY_PORT", "registry 127.0.0.1:{port}"),
    (["deploy", "get", "digits"], "CNEI_REGISTRY_PORT", "registry 127.0.0.1:{port}"),
    (["infer", "digits"], "CNEI_GRPC_PORT", "127.0.0.1:{port}"),
    (["train", "list"], "CNEI_TRAINER_PORT", "127.0.0.1:{port}"),
])
def test_a_command_calls_the_servers_cnei_up_starts_under_the_same_settings(argv, setting, says, monkeypatch,
                                                                             capsys):
    port = infra.free_port()  # nothing listens there: the error names where the command called
    monkeypatch.setenv(setting, str(port))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and says.format(port=port) in err, err


def test_cnei_status_reads_the_coordinator_and_redis_cnei_up_starts_under_the_same_settings(monkeypatch):
    monkeypatch.setenv("CNEI_HTTP_PORT", "18123")
    monkeypatch.setenv("CNEI_REDIS_URL", "redis://127.0.0.1:16399/0")
    args = cli.parser().parse_args(["status"])
    assert (args.url, args.redis, args.registry) == ("http://127.0.0.1:18123", "redis://127.0.0.1:16399/0",
                                                     "127.0.0.1:50051")
