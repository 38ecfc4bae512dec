"""The cluster's secret: where a node takes it from, the one stored on first start, and the proofs derived from it."""

import os
import stat
import threading

import pytest

from exo.base.errors import BadInput
from exo.networking.membership import SECRET_ENV, Membership, NotAMember, cluster_membership, stored_secret, stored_secret_path
from exo.node_flags import build_parser

SECRET = "a-cluster-secret-long-enough"


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
  """No secret in the environment and an empty config folder: what a first start sees."""
  monkeypatch.delenv(SECRET_ENV, raising=False)
  monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
  return tmp_path


def test_a_first_start_stores_a_new_secret_readable_by_its_owner_only_and_later_starts_reuse_it(fresh_home):
  first = cluster_membership()
  path = fresh_home / "config" / "exo" / "cluster-secret"
  assert first.source == str(path) and path.read_text().strip() == first.secret
  assert stat.S_IMODE(path.stat().st_mode) == 0o600
  assert len(first.secret) >= 40  # secrets.token_urlsafe(32): 43 characters, 256 bits
  assert cluster_membership() == first
  assert os.listdir(path.parent) == ["cluster-secret"]  # no draft left behind


def test_without_xdg_config_home_the_secret_is_stored_under_home(tmp_path, monkeypatch):
  monkeypatch.delenv(SECRET_ENV, raising=False)
  monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert cluster_membership().source == str(tmp_path / ".config" / "exo" / "cluster-secret")
  assert (tmp_path / ".config" / "exo" / "cluster-secret").exists()


def test_nodes_starting_at_once_on_one_machine_store_one_secret(fresh_home):
  path, secrets, ready = stored_secret_path(), [], threading.Barrier(8)

  def start():
    ready.wait()
    secrets.append(stored_secret(path))

  threads = [threading.Thread(target=start) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(set(secrets)) == 1 and len(secrets) == 8
  assert os.listdir(path.parent) == ["cluster-secret"]


def test_the_flag_then_the_file_then_the_environment_then_the_stored_secret(fresh_home, monkeypatch):
  secret_file = fresh_home / "secret.txt"
  secret_file.write_text("the-secret-in-a-file-xyz\n")
  monkeypatch.setenv(SECRET_ENV, "the-secret-from-the-environment")
  assert cluster_membership(SECRET).secret == SECRET
  assert cluster_membership(None, str(secret_file)).secret == "the-secret-in-a-file-xyz"
  assert cluster_membership() == Membership("the-secret-from-the-environment", SECRET_ENV)
  assert not stored_secret_path().exists()  # a secret given is used, never stored
  monkeypatch.delenv(SECRET_ENV)
  assert cluster_membership().source == str(stored_secret_path())


@pytest.mark.parametrize(
  "make, problem",
  [
    (lambda home: cluster_membership("short"), "has 5 characters; expected at least 16"),
    (lambda home: cluster_membership(None, str(home / "missing")), "cannot read cluster secret file"),
    (lambda home: cluster_membership(None, str(home)), "is not a regular file"),
    (lambda home: cluster_membership(None, "/dev/zero"), "is not a regular file"),
  ],
)
def test_a_bad_secret_is_a_one_line_error(fresh_home, make, problem):
  with pytest.raises(BadInput, match=problem) as raised:
    make(fresh_home)
  assert "\n" not in str(raised.value)


def test_the_secret_flags_exclude_each_other(capsys):
  with pytest.raises(SystemExit) as raised:
    build_parser().parse_args(["--cluster-secret", SECRET, "--cluster-secret-file", "f"])
  assert raised.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_the_token_proves_the_secret_without_revealing_it():
  one, same, other = Membership(SECRET, "a"), Membership(SECRET, "b"), Membership(SECRET + "!", "c")
  assert same.accepts_token(one.token()) and not other.accepts_token(one.token())
  assert not one.accepts_token(None) and not one.accepts_token("") and not one.accepts_token(SECRET)
  assert SECRET not in one.token() and SECRET not in repr(one)


def test_the_join_hint_names_where_the_secret_is_but_never_the_secret(fresh_home):
  stored = cluster_membership()
  for membership in (stored, Membership(SECRET, SECRET_ENV), Membership(SECRET, "--cluster-secret"), Membership(SECRET, "--cluster-secret-file /s")):
    assert membership.secret not in membership.join_hint()
  assert stored.source in stored.join_hint() and "--cluster-secret-file" in stored.join_hint()
  assert SECRET_ENV in Membership(SECRET, SECRET_ENV).join_hint()


def test_an_announcement_opens_only_with_the_secret_that_sealed_it():
  one, other = Membership(SECRET, "a"), Membership(SECRET + "!", "b")
  message = {"type": "discovery", "node_id": "n", "grpc_port": 5}
  assert one.open(one.seal(message, now=12.5)) == {**message, "timestamp": 12.5}
  with pytest.raises(NotAMember, match="does not match"):
    other.open(one.seal(message))
