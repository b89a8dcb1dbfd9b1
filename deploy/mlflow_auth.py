"""Set up MLflow's basic-auth app for the cluster's tracking server, and the credentials jobs log with.

Two identities (MLflow basic auth, ``mlflow server --app-name basic-auth``):

* the **admin** (``admin``): bootstrapped by the server itself on first start from
  ``MLFLOW_AUTH_ADMIN_PASSWORD``; it creates users and grants permissions. Its password stays with the
  server: generated on the head (``server --generate-secrets``) or given by a Kubernetes Secret.
* the **jobs user** (``cascadelab-jobs`` by default, not an admin): what every driver and Train worker
  logs as. Its ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` are set in the environment of
  ``ray start`` on every node, so jobs inherit them without naming them; it owns (MANAGE) the
  experiments it creates, every other user reads them (``default_permission = READ``).

Commands (Python 3.11 with ``mlflow[auth]`` installed; mlflow is imported lazily, inside ``server``)::

    python deploy/mlflow_auth.py client-env ~/.cascadelab/mlflow.env
        # on your laptop, once: the jobs user's credentials as a KEY=VALUE file (mode 0600) that the
        # cluster launcher copies to every node and `ray start` sources; an existing file is kept
    python deploy/mlflow_auth.py server --state-dir ~/mlflow --generate-secrets
        # on the head, before `mlflow server`: writes STATE_DIR/basic_auth.ini (no secrets; the server
        # reads it through MLFLOW_AUTH_CONFIG_PATH), with --generate-secrets STATE_DIR/server.env (the
        # admin password and the Flask secret key, mode 0600, generated once), and creates the jobs
        # user named by MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the user store, or
        # resets its password to that one

Both print paths and user names, never a password. Exit status 0, or 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

ADMIN_USERNAME = "admin"
JOBS_USERNAME = "cascadelab-jobs"
#: Who may read an experiment they were granted nothing on; ``NO_PERMISSIONS`` makes experiments private.
DEFAULT_PERMISSION = "READ"
#: Seconds a checked username/password pair stays valid in each server worker. Without the cache every
#: request (each metric batch a job logs) pays a PBKDF2 password hash on the server; with it a deleted
#: user or a changed password keeps working for up to this long.
AUTH_CACHE_TTL_S = 60
#: MLflow's basic-auth app refuses passwords shorter than 12 characters; these are 32 random bytes.
_TOKEN_BYTES = 32


class SetupError(RuntimeError):
    """A one-line problem with the files or the environment this script was given."""


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (the file never exists with wider bits)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments and blank lines skipped), as ``set -a; . FILE`` reads them."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise SetupError(f"{path}: expected KEY=VALUE lines, got '{key}'")
            env[key.strip()] = value.strip()
    return env


def client_env(path: Path, username: str = JOBS_USERNAME) -> bool:
    """Write the jobs user's credentials file at ``path`` unless it exists; True when it was written."""
    if path.exists():
        return False
    password = secrets.token_urlsafe(_TOKEN_BYTES)
    _write_private(path, "# MLflow basic-auth credentials of the user cluster jobs log as; keep private.\n"
                         f"MLFLOW_TRACKING_USERNAME={username}\nMLFLOW_TRACKING_PASSWORD={password}\n")
    return True


def auth_config_text(state_dir: Path, admin_username: str = ADMIN_USERNAME) -> str:
    """The ``basic_auth.ini`` of a server whose user store is ``STATE_DIR/basic_auth.db`` (SQLite)."""
    return ("[mlflow]\n"
            f"default_permission = {DEFAULT_PERMISSION}\n"
            f"database_uri = sqlite:///{state_dir.resolve() / 'basic_auth.db'}\n"
            f"admin_username = {admin_username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n")


def server_secrets(path: Path) -> bool:
    """Generate the admin password and the Flask secret key into ``path`` once; True when written."""
    if path.exists():
        return False
    _write_private(path, "# MLflow server secrets: the basic-auth admin's first password, CSRF key.\n"
                         f"MLFLOW_AUTH_ADMIN_PASSWORD={secrets.token_urlsafe(_TOKEN_BYTES)}\n"
                         f"MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(_TOKEN_BYTES)}\n")
    return True


def ensure_user(config_path: Path, username: str, password: str) -> str:
    """Create the non-admin ``username`` in the user store named by ``config_path`` (the server need not
    run), or set its password; returns ``created``, ``updated`` or ``unchanged``."""
    import configparser

    if len(password) < 12:  # the server's own rule, checked here to name the variable
        raise SetupError(f"MLFLOW_TRACKING_PASSWORD of {username} is shorter than 12 characters")
    parser = configparser.ConfigParser()
    parser.read(config_path)
    if username == parser["mlflow"].get("admin_username"):
        raise SetupError(f"MLFLOW_TRACKING_USERNAME={username} is the admin; jobs need a user of their own")
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(config_path)  # read when mlflow.server.auth is imported
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(parser["mlflow"]["database_uri"])
    if not store.has_user(username):
        store.create_user(username, password, is_admin=False)
        return "created"
    if store.authenticate_user(username, password):
        return "unchanged"
    store.update_user(username, password=password)
    return "updated"


def _server(args: argparse.Namespace) -> None:
    state = Path(args.state_dir).expanduser()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.chmod(0o700)  # the user store and server.env live here
    config = state / "basic_auth.ini"
    config.write_text(auth_config_text(state, os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or ADMIN_USERNAME))
    print(f"auth config: {config} (set MLFLOW_AUTH_CONFIG_PATH to it)")
    if args.generate_secrets:
        written = server_secrets(state / "server.env")
        print(f"server secrets: {state / 'server.env'} ({'generated' if written else 'kept'})")
    username, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not (username and password):
        raise SetupError("MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD are not set: source the jobs "
                         "user's credentials (`python deploy/mlflow_auth.py client-env FILE`) first")
    print(f"jobs user {username}: {ensure_user(config, username, password)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python deploy/mlflow_auth.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("client-env", help="write the jobs user's credentials file (laptop, once)")
    c.add_argument("path")
    c.add_argument("--username", default=JOBS_USERNAME)
    s = sub.add_parser("server", help="auth config, server secrets and the jobs user (head, before the server)")
    s.add_argument("--state-dir", required=True)
    s.add_argument("--generate-secrets", action="store_true",
                   help="generate STATE_DIR/server.env (admin password, Flask secret key) if it is missing")
    args = parser.parse_args(argv)
    try:
        if args.command == "client-env":
            path = Path(args.path).expanduser()
            written = client_env(path, args.username)
            print(f"{path}: {'written' if written else 'exists, kept'}")
        else:
            _server(args)
    except (SetupError, OSError, KeyError) as exc:
        print(f"mlflow_auth: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
