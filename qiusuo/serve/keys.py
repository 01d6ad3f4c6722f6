"""API keys and the usage ledger, in one SQLite file.

- A key reads `qs-<id>-<secret>`. Only its SHA-256 is stored; a presented key is looked up by its id
  and its hash compared with `hmac.compare_digest`, so the comparison takes the same time whatever
  the prefix an attacker guessed right. (The secret has 192 random bits, so an unsalted hash is safe.)
- Every request that reached the model writes one `usage` row (tokens, cost and how it ended) and adds
  the cost to its key's `spent` in the same transaction, so `spent` equals the sum of its rows (of all
  rows ever written: pruning old rows, `prune`, leaves `spent` alone).
- WAL mode lets `qiusuo keys list` read while the server writes. Calls are short (well under a
  millisecond), so the server makes them directly from its event loop, serialised by one lock; the
  server waits at most `busy_timeout` for a lock held elsewhere and then fails the call
  (`sqlite3.OperationalError`), which it answers with 503 rather than stall every stream.
- A database written before `max_concurrent` existed gains the column when opened (`_migrate`).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DB = "runs/serve.sqlite"  # shared by `qiusuo serve` and `qiusuo keys` (runs/ is git-ignored)

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    rpm INTEGER NOT NULL,          -- requests per minute
    tpm INTEGER NOT NULL,          -- tokens (prompt + completion) per minute
    balance REAL NOT NULL,         -- USD granted to the key
    spent REAL NOT NULL DEFAULT 0, -- USD used so far (the sum of its usage rows)
    max_concurrent INTEGER         -- requests in flight at once; NULL: the server's --key-max-concurrent
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT,                   -- NULL when the server runs with --no-auth
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,   -- reasoning included
    reasoning_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,            -- USD
    finish_reason TEXT,            -- stop, length, cancelled or error
    started_at REAL NOT NULL,      -- unix time
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_key ON usage (key_id);
CREATE INDEX IF NOT EXISTS usage_finished ON usage (finished_at);
"""


@dataclass(frozen=True)
class Key:
    id: str
    name: str
    created_at: float
    revoked_at: float | None
    rpm: int
    tpm: int
    balance: float
    spent: float
    max_concurrent: int | None = None
    """Requests in flight at once; None: the server's default (`--key-max-concurrent`)."""

    @property
    def remaining(self) -> float:
        return self.balance - self.spent


@dataclass(frozen=True)
class Usage:
    """What one request used; the server reports exactly these numbers to the client."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost: float

    def as_openai(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: str | Path, busy_timeout: float = 5.0):
        """`busy_timeout`: seconds a call waits for a lock another process holds before it fails."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash in WAL mode
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            self._migrate()
            self._db.executescript(SCHEMA)

    def _migrate(self) -> None:
        """Bring a file written by an older qiusuo up to `SCHEMA` (columns added since)."""
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(keys)")}
        if columns and "max_concurrent" not in columns:
            self._db.execute("ALTER TABLE keys ADD COLUMN max_concurrent INTEGER")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- keys ----------------------------------------------------------------------------------
    def create(self, name: str, rpm: int = 60, tpm: int = 100_000, balance: float = 5.0,
               max_concurrent: int | None = None) -> tuple[Key, str]:
        """A new key; the secret is returned once and never stored."""
        if rpm < 1 or tpm < 1 or balance < 0 or (max_concurrent is not None and max_concurrent < 1):
            raise ValueError("rpm, tpm and max_concurrent must be ≥ 1 and balance ≥ 0")
        key_id = secrets.token_hex(4)
        secret = f"qs-{key_id}-{secrets.token_urlsafe(24)}"
        with self._lock:
            self._db.execute("INSERT INTO keys (id, name, hash, created_at, rpm, tpm, balance, max_concurrent)"
                             " VALUES (?,?,?,?,?,?,?,?)",
                             (key_id, name, hash_key(secret), time.time(), rpm, tpm, balance, max_concurrent))
        return self.get(key_id), secret

    def get(self, key_id: str) -> Key | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
        return _key(row) if row else None

    def list(self) -> list[Key]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM keys ORDER BY created_at").fetchall()
        return [_key(r) for r in rows]

    def revoke(self, key_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                   (time.time(), key_id))
        return cur.rowcount == 1

    def authenticate(self, secret: str) -> Key | None:
        """The live key this secret belongs to, or None (unknown, wrong or revoked)."""
        parts = secret.split("-", 2)
        if len(parts) != 3 or parts[0] != "qs":
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM keys WHERE id = ?", (parts[1],)).fetchone()
        if row is None or not hmac.compare_digest(row["hash"], hash_key(secret)):
            return None
        return None if row["revoked_at"] is not None else _key(row)

    # --- ledger --------------------------------------------------------------------------------
    def record(self, key_id: str | None, request_id: str, model: str, usage: Usage, finish_reason: str | None,
               started_at: float, finished_at: float) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT INTO usage (key_id, request_id, model, prompt_tokens, completion_tokens, reasoning_tokens,"
                    " cost, finish_reason, started_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (key_id, request_id, model, usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens,
                     usage.cost, finish_reason, started_at, finished_at))
                if key_id is not None:
                    self._db.execute("UPDATE keys SET spent = spent + ? WHERE id = ?", (usage.cost, key_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def prune(self, older_than_days: float) -> int:
        """Delete usage rows that finished more than `older_than_days` ago; returns how many."""
        with self._lock:
            cur = self._db.execute("DELETE FROM usage WHERE finished_at < ?", (time.time() - older_than_days * 86400,))
        return cur.rowcount

    def usage_rows(self, key_id: str | None = None) -> list[dict]:
        query, args = "SELECT * FROM usage", ()
        if key_id is not None:
            query, args = query + " WHERE key_id = ?", (key_id,)
        with self._lock:
            return [dict(r) for r in self._db.execute(query + " ORDER BY id", args).fetchall()]

    def totals(self, key_id: str | None = None) -> dict:
        """Requests, tokens and cost summed over the ledger (one key, or all rows)."""
        where, args = ("WHERE key_id = ?", (key_id,)) if key_id is not None else ("", ())
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) AS requests, COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens,"
                " COALESCE(SUM(completion_tokens), 0) AS completion_tokens,"
                " COALESCE(SUM(reasoning_tokens), 0) AS reasoning_tokens, COALESCE(SUM(cost), 0.0) AS cost"
                f" FROM usage {where}", args).fetchone()
        return dict(row)


def _key(row: sqlite3.Row) -> Key:
    return Key(id=row["id"], name=row["name"], created_at=row["created_at"], revoked_at=row["revoked_at"],
               rpm=row["rpm"], tpm=row["tpm"], balance=row["balance"], spent=row["spent"],
               max_concurrent=row["max_concurrent"])


def keys_command(args) -> None:
    """`qiusuo keys create|list|revoke` (argparse namespace from qiusuo.cli)."""
    store = KeyStore(args.db)
    try:
        if args.keys_command == "create":
            key, secret = store.create(args.name, rpm=args.rpm, tpm=args.tpm, balance=args.balance,
                                       max_concurrent=getattr(args, "max_concurrent", None))
            at_once = "the server's default" if key.max_concurrent is None else key.max_concurrent
            print(f"created key {key.id} ({key.name}): {key.rpm} requests/min, {key.tpm} tokens/min, "
                  f"{at_once} at once, ${key.balance:.2f}")
            print("The key is shown once — store it now:")
            print(secret)
        elif args.keys_command == "list":
            # Plain aligned columns (not a rich table) so the listing survives pipes and narrow terminals.
            print(f"{'id':8}  {'name':16}  {'created':16}  {'status':7}  {'rpm':>6}  {'tpm':>9}  {'conc':>4}"
                  f"  {'balance$':>9}  {'spent$':>10}  {'requests':>8}")
            for k in store.list():
                created = time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created_at))
                status, requests = "revoked" if k.revoked_at else "active", store.totals(k.id)["requests"]
                conc = "-" if k.max_concurrent is None else k.max_concurrent
                print(f"{k.id:8}  {k.name[:16]:16}  {created:16}  {status:7}  {k.rpm:>6}  {k.tpm:>9}  {conc:>4}"
                      f"  {k.balance:>9.2f}  {k.spent:>10.6f}  {requests:>8}")
        elif not store.revoke(args.key_id):
            raise ValueError(f"no active key {args.key_id!r} in {args.db}")
        else:
            print(f"revoked key {args.key_id}")
    finally:
        store.close()
