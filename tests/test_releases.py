"""``mash.releases``: the ``current`` link switched in one rename, a venv copied with its own
paths rewritten, and only the last two good releases kept."""
import os

from mash import releases
from mash.config import release_home


def fake_release(home, version, shebang_of=None):
    r = home / "releases" / version
    (r / "bin").mkdir(parents=True)
    (r / "bin" / "mash").write_text(f"#!{shebang_of or r.resolve()}/bin/python\nimport mash\n")
    (r / "pyvenv.cfg").write_text(f"home = /usr/bin\ncommand = python3 -m venv {r.resolve()}\n")
    return r


def test_releases_switch_points_current_at_a_release_relatively(tmp_path):
    a, b = fake_release(tmp_path, "0.1.0"), fake_release(tmp_path, "0.1.1")
    assert releases.switch(tmp_path, a) is None
    assert releases.switch(tmp_path, b) == a.resolve()
    link = tmp_path / "current"
    assert os.readlink(link) == "releases/0.1.1"          # survives moving the home
    assert releases.current_version(tmp_path) == "0.1.1" and releases.laid_out(tmp_path)
    assert not list(tmp_path.glob(".current.*"))


def test_releases_copy_env_rewrites_the_venvs_own_paths(tmp_path):
    src = fake_release(tmp_path, "0.1.0")
    (src / "bin" / "python").symlink_to("/usr/bin/python3")
    dest = tmp_path / "releases" / "0.1.1"
    releases.copy_env(src, dest)
    assert (dest / "bin" / "mash").read_text().startswith(f"#!{dest.resolve()}/bin/python\n")
    assert str(dest.resolve()) in (dest / "pyvenv.cfg").read_text()
    assert os.readlink(dest / "bin" / "python") == "/usr/bin/python3"
    assert (src / "bin" / "mash").read_text().startswith(f"#!{src.resolve()}/bin/python")


def test_releases_prune_keeps_the_last_two_good_and_the_current(tmp_path):
    for v in ("0.1.0", "0.1.1", "0.1.2", "0.1.3"):
        fake_release(tmp_path, v)
    releases.switch(tmp_path, tmp_path / "releases" / "0.1.3")
    state = releases.State(tmp_path)
    for v in ("0.1.0", "0.1.1", "0.1.3"):
        state.kept(v)
    state.failed("0.1.2", "the reader did not come back")
    assert releases.prune(tmp_path, state) == ["0.1.0", "0.1.2"]
    again = releases.State(tmp_path)
    assert again.good == ["0.1.1", "0.1.3"] and "0.1.2" in again.bad


def test_releases_home_of_a_release_python(tmp_path, monkeypatch):
    r = fake_release(tmp_path, "0.1.0")
    releases.switch(tmp_path, r)
    monkeypatch.setattr("sys.prefix", str(tmp_path / "current"))      # as the units start it
    assert release_home() == tmp_path.resolve()
    monkeypatch.setattr("sys.prefix", str(tmp_path / "elsewhere"))
    assert release_home() is None
