"""Exit statuses that mean one thing, and messages that are one line.

0 success; 1 only `apply`'s "changes" (and `demo`'s failed probes); 2 bad input or a failed
change undone, one line; 3 a crash (an exception no command handled), one line, with the
traceback only under `kproxy-nft -v`; 130 Ctrl-C. Crashes are injected by monkeypatching
something a command calls; the real entry point is checked in a subprocess too.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import kproxy_nft.cli as cli
from kproxy_nft.cli import main
from kproxy_nft.kernel import iptables as kernel
from kproxy_nft.kernel.iptables_fake import FakeIptables
from kproxy_nft.kernel.runner import Completed
from kproxy_nft.model import IPFamily
from kproxy_nft.report import fail, one_line
from tests.helpers import EXAMPLES

CRASH_LINE = "kproxy-nft: internal error: RuntimeError: boom"
MANIFESTS = str(EXAMPLES / "sample-clusterip-multi.yaml")  # no notices on stderr


def invoke(*args: str) -> Result:
    # catch_exceptions=False: an exception that got past the CLI's net fails the test itself.
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def crash(*args: object, **kwargs: object) -> None:
    raise RuntimeError("boom\nsecond line of the message")


# ---------------------------------------------------------------------------------------------
# crashes: exit 3, one line
# ---------------------------------------------------------------------------------------------

# (what to break, the command that calls it)
CRASHES = {
    "dump": ("kproxy_nft.compile.iptables.compile_ruleset", ["dump", "-f", MANIFESTS]),
    "apply (while reading input)": ("kproxy_nft.cli.load_inputs", ["apply", "-f", MANIFESTS]),
    "apply (in the kernel layer)": ("kproxy_nft.kernel.iptables.open_host", ["apply", "-f", MANIFESTS]),
    "cleanup": ("kproxy_nft.kernel.iptables.open_host", ["cleanup", "--proxy-mode", "iptables"]),
    "run": ("kproxy_nft.cli.load_settings", ["run", "--manifests", MANIFESTS]),
    "env": ("kproxy_nft.discovery.envvars.service_environment", ["env", "-f", MANIFESTS]),
    "dns records": ("kproxy_nft.discovery.zonefile.render_master_files", ["dns", "records", "-f", MANIFESTS]),
}


@pytest.mark.parametrize("case", sorted(CRASHES))
def test_a_crash_in_any_command_exits_3_with_one_line(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    target, args = CRASHES[case]
    monkeypatch.setattr(target, crash)
    result = invoke(*args)
    assert result.exit_code == 3, result.output
    assert result.stderr == CRASH_LINE + "\n"


def test_a_crash_under_verbose_shows_the_traceback_then_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kproxy_nft.compile.iptables.compile_ruleset", crash)
    for args in (["-v", "dump", "-f", MANIFESTS], ["--verbose", "dump", "-f", MANIFESTS]):
        result = invoke(*args)
        assert result.exit_code == 3
        lines = result.stderr.splitlines()
        assert lines[0] == "Traceback (most recent call last):"
        assert "RuntimeError: boom" in lines and "second line of the message" in lines
        assert lines[-1] == CRASH_LINE


def test_run_verbose_also_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("logging.basicConfig", crash)  # run calls it after reading -v
    result = invoke("run", "-v", "--manifests", MANIFESTS)
    assert result.exit_code == 3
    assert result.stderr.startswith("Traceback") and result.stderr.splitlines()[-1] == CRASH_LINE


def test_a_crash_through_the_real_entry_point(tmp_path: Path) -> None:
    """Standalone click (sys.exit), no CliRunner: the installed `kproxy-nft` behaves the same."""
    code = ("import kproxy_nft.compile.iptables as c\n"
            "def boom(*a, **k): raise RuntimeError('boom\\nsecond line')\n"
            "c.compile_ruleset = boom\n"
            "from kproxy_nft.cli import main\n"
            "main()\n")  # fmt: skip
    for verbose in ([], ["-v"]):
        result = subprocess.run([sys.executable, "-c", code, *verbose, "dump", "-f", MANIFESTS],
                                capture_output=True, text=True, check=False, cwd=tmp_path)
        assert result.returncode == 3, result.stderr
        assert result.stdout == ""
        assert result.stderr.splitlines()[-1] == CRASH_LINE
        assert ("Traceback" in result.stderr) == bool(verbose)
        if not verbose:
            assert result.stderr == CRASH_LINE + "\n"


def test_an_exception_whose_message_is_empty_or_unprintable_still_gets_its_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    for error, line in ((KeyError(), "KeyError"), (Unprintable(), "Unprintable: (message unavailable)")):
        def raise_it(*args: object, error: Exception = error, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr("kproxy_nft.compile.iptables.compile_ruleset", raise_it)
        result = invoke("dump", "-f", MANIFESTS)
        assert result.exit_code == 3
        assert result.stderr == f"kproxy-nft: internal error: {line}\n"


def test_ctrl_c_exits_130_not_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("kproxy_nft.compile.iptables.compile_ruleset", interrupt)
    result = invoke("dump", "-f", MANIFESTS)
    assert result.exit_code == 130
    assert result.stderr == "kproxy-nft: interrupted\n"


def test_usage_errors_and_bad_input_still_exit_2() -> None:
    assert invoke("dump").exit_code == 2  # click: -f missing
    result = invoke("dump", "-f", "/nonexistent/kproxy-nft/path")
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("kproxy-nft: error: ")


# ---------------------------------------------------------------------------------------------
# fail(): one bounded line
# ---------------------------------------------------------------------------------------------


def failed(capsys: pytest.CaptureFixture[str], message: str) -> str:
    with pytest.raises(SystemExit) as caught:
        fail(message)
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.endswith("\n") and err.count("\n") == 1
    return err[:-1]


def test_fail_escapes_newlines_and_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    line = failed(capsys, "bad name 'a\nb'\r\tc\x1b[31m red\x00\x85\u2028end")
    assert line == "kproxy-nft: error: bad name 'a\\nb'\\r\\tc\\x1b[31m red\\x00\\x85\\u2028end"
    assert len(line.splitlines()) == 1


def test_fail_cuts_a_huge_message(capsys: pytest.CaptureFixture[str]) -> None:
    huge = "x" * 50_000_000  # a 50 MB name must not be echoed
    start = time.perf_counter()
    line = failed(capsys, f"no such service: {huge}")
    assert time.perf_counter() - start < 1
    assert len(line) < 1100
    assert line.endswith("… (50,000,017 characters)")
    assert line.startswith("kproxy-nft: error: no such service: xxx")


def test_fail_cuts_a_message_of_many_newlines(capsys: pytest.CaptureFixture[str]) -> None:
    line = failed(capsys, "\n" * 100_000)
    assert len(line) < 1100 and line.endswith("(100,000 characters)")


def test_one_line_leaves_ordinary_messages_alone() -> None:
    assert one_line("cannot read x.yaml: line 3: mapping values are not allowed here") == (
        "cannot read x.yaml: line 3: mapping values are not allowed here"
    )
    assert one_line("é ü ß → 10.0.0.1:80") == "é ü ß → 10.0.0.1:80"
    assert one_line("y" * 1000) == "y" * 1000
    assert one_line("y" * 1001).endswith("… (1,001 characters)")


# ---------------------------------------------------------------------------------------------
# apply in iptables mode: an IPv6 failure is exit 2, one line, IPv4 reverted (a fake iptables)
# ---------------------------------------------------------------------------------------------

IPV6_REFUSAL = (
    "ip6tables-nft-restore v1.8.9 (nf_tables): \n"
    "line 3: RULE_APPEND failed (Invalid argument): rule in chain KUBE-SERVICES\n"
)


class RefusingIpv6(FakeIptables):
    """The fake iptables, except that ip6tables-nft-restore refuses every commit (not --test runs)."""

    def run(self, argv: Sequence[str], input: str | None = None) -> Completed:
        if argv[0] == "ip6tables-nft-restore" and "--test" not in argv:
            self.calls.append((tuple(argv), input))
            return Completed(4, "", IPV6_REFUSAL)
        return super().run(argv, input)


def test_apply_whose_ipv6_half_fails_exits_2_in_one_line_with_ipv4_reverted(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = RefusingIpv6()
    host = kernel.Host(kernel.IptablesBackend.NFT, None, fake)
    monkeypatch.setattr(kernel, "open_host", lambda backend=None, netns=None: host)
    result = invoke("apply", "-f", MANIFESTS, "--proxy-mode", "iptables", "--iptables-backend", "nft")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("kproxy-nft: error: RestoreError: ip6tables-nft-restore failed")
    assert "RULE_APPEND failed (Invalid argument): rule in chain KUBE-SERVICES" in line
    assert "the kernel is unchanged" in line and "IPv4 reverted" in line
    restores = [argv for argv, _ in fake.calls if "restore" in argv[0] and "--test" not in argv]
    assert [argv[0] for argv in restores] == ["iptables-nft-restore", "ip6tables-nft-restore", "iptables-nft-restore"]
    v4 = fake.state("nft", IPFamily.V4)  # committed, then reverted: only empty built-in chains
    assert all(c.builtin and not c.rules for table in v4.tables.values() for c in table.chains.values())


def test_apply_with_a_kernel_error_exits_2_and_a_bug_there_exits_3(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing_tool(*args: object, **kwargs: object) -> None:
        raise kernel.CommandError(["iptables-nft-save", "-t", "nat"], Completed(127, "", "not found\nat all"))

    args = ("apply", "-f", MANIFESTS, "--proxy-mode", "iptables")
    monkeypatch.setattr(kernel, "open_host", missing_tool)
    result = invoke(*args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("kproxy-nft: error: CommandError: iptables-nft-save -t nat exited with status 127")
    monkeypatch.setattr(kernel, "open_host", crash)
    assert invoke(*args).exit_code == 3


def test_cli_main_is_the_console_entry_point() -> None:
    import tomllib

    scripts = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"kproxy-nft": "kproxy_nft.cli:main"}
    assert cli.main is main
