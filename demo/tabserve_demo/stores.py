"""The production registry's stores as child processes on loopback, for the tests and the benchmark.

- `PostgresCluster`: a throwaway PostgreSQL cluster (initdb into a fresh temporary directory) served by
  `postgres` as an unprivileged user (PostgreSQL refuses to run as root), password authentication, TCP only;
- `S3Store`: moto's standalone S3-compatible server. It keeps objects in memory, so `snapshot()` and
  `restore()` carry a bucket's content across a restart on the same port.

Both are `ServiceProcess`es (processes.py): restartable on the same port, stopped as a process group.
The PostgreSQL binaries' directory is the caller's to find (the tests install Debian's `postgresql` through
tools/debian.py, which is not part of this package).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from tabserve_demo.processes import ServiceProcess, http_ok

S3_REGION = "us-east-1"


class PostgresCluster(ServiceProcess):
    """A PostgreSQL cluster in a fresh temporary directory (`remove()` deletes it), run as `run_as` when we are
    root; superuser `user` with `password` (scram-sha-256), listening on 127.0.0.1 only."""

    name = "postgres"
    # Fast shutdown: SIGTERM would wait for every client (the tracking server's pooled connections) to leave.
    stop_signal = signal.SIGINT

    def __init__(
        self, bin_dir: Path, password: str, *, user: str = "tabserve", run_as: str = "nobody",
        port: int | None = None,
    ) -> None:
        self.bin_dir = bin_dir
        self.user = user
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix="tabserve-pg-"))  # in /tmp: `run_as` cannot enter pytest's dirs
        self._ids = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam(run_as)
            self._ids = (entry.pw_uid, entry.pw_gid)
            os.chown(self.root, *self._ids)
        super().__init__(self.root / "postgres.log", port, {"LC_ALL": "C"})
        self._initdb()

    def popen_options(self) -> dict[str, Any]:
        if self._ids is None:
            return {"cwd": self.root}
        return {"cwd": self.root, "user": self._ids[0], "group": self._ids[1], "extra_groups": []}

    def _initdb(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        password_file.chmod(0o600)
        if self._ids is not None:
            os.chown(password_file, *self._ids)
        try:
            done = subprocess.run(
                [str(self.bin_dir / "initdb"), "-D", str(self.root / "data"), "-U", self.user, "--pwfile",
                 str(password_file), "--auth=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync"],
                capture_output=True, text=True, timeout=180, env=self._env, check=False, **self.popen_options(),
            )
        finally:
            password_file.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}")

    def command(self) -> list[str]:
        # fsync off: a throwaway cluster, always stopped with a clean (fast) shutdown.
        return [str(self.bin_dir / "postgres"), "-D", str(self.root / "data"), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
                "-c", "fsync=off", "-c", "max_connections=60"]

    def healthy(self) -> bool:
        try:
            done = subprocess.run([str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port),
                                   "-t", "2"], capture_output=True, timeout=10, check=False)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def create_database(self, name: str) -> str:
        """Create database `name` (the password goes through the environment, never the command line);
        returns its SQLAlchemy URI, password included."""
        done = subprocess.run(
            [str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name],
            capture_output=True, text=True, timeout=60, check=False, env={**self._env, "PGPASSWORD": self.password},
        )
        if done.returncode != 0:
            raise RuntimeError(f"createdb {name} failed ({done.returncode}): {done.stderr[-1500:]}")
        return self.uri(name)

    def uri(self, database: str) -> str:
        password = urllib.parse.quote(self.password, safe="")
        return f"postgresql://{self.user}:{password}@127.0.0.1:{self.port}/{database}"

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class S3Store(ServiceProcess):
    """moto's standalone S3 server on loopback; any key pair is accepted, `access_key`/`secret_key` are the
    ones the tests hand to clients (and look for in logs)."""

    name = "moto server"

    def __init__(self, log_file: Path, access_key: str, secret_key: str, port: int | None = None) -> None:
        super().__init__(log_file, port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_key = access_key
        self.secret_key = secret_key

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def healthy(self) -> bool:
        return http_ok(f"{self.url}/moto-api/data.json")

    def client_env(self) -> dict[str, str]:
        """What an MLflow/AWS client needs in its environment to reach this store."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": S3_REGION, "MLFLOW_S3_ENDPOINT_URL": self.url}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=S3_REGION)

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def snapshot(self, bucket: str) -> dict[str, bytes]:
        """Every object of `bucket`, key -> content."""
        client = self.client()
        objects: dict[str, bytes] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                objects[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return objects

    def restore(self, bucket: str, objects: dict[str, bytes]) -> None:
        """Create `bucket` (after a restart it is gone) and put `objects` back."""
        client = self.client()
        client.create_bucket(Bucket=bucket)
        for key, body in objects.items():
            client.put_object(Bucket=bucket, Key=key, Body=body)
