#!/usr/bin/env bash
# Prepares the local PostgreSQL server (127.0.0.1:5432, trust for `postgres`)
# for the connection tests, idempotently:
# - a throw-away CA, a server certificate for localhost/127.0.0.1 and a client
#   certificate for the role pj_cert, made here and kept in $TLS_DIR;
# - the server uses that certificate (ALTER SYSTEM, reload: no restart);
# - pg_hba.conf rules, above the existing ones: role pj_scram logs in over TLS
#   only, with a SCRAM-SHA-256 password; role pj_cert over TLS only, with its
#   client certificate;
# - both roles may create schemas in the database `test`;
# - PgBouncer (Debian's package) in transaction pooling mode on
#   127.0.0.1:6432 in front of the database `test`, for the role pj_bouncer
#   (its search path: the schema pj_bouncer).
# Prints the TLS directory. Run as root (or as a user who can write the
# server's configuration and the TLS directory).
set -euo pipefail

TLS_DIR="${PROJECTIONIST_TEST_PG_TLS_DIR:-/var/lib/postgresql/projectionist-tls}"
PSQL=(psql -h 127.0.0.1 -U postgres -d test -v ON_ERROR_STOP=1 -qAt)
MARK="# projectionist test roles (scripts/pg-test-setup.sh)"

command -v openssl >/dev/null || {
  apt-get update -qq >&2 && apt-get install -y -qq openssl >/dev/null
}

mkdir -p "$TLS_DIR"
cd "$TLS_DIR"
# The stamp names this recipe: a directory made by an older one is made anew.
if [ ! -e recipe-2 ]; then
  rm -f ./*.crt ./*.key ./*.csr ./*.ext ./*.srl
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=projectionist test CA" \
    -keyout ca.key -out ca.crt 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout server.key -out server.csr 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile server.ext -out server.crt 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=pj_cert" \
    -keyout client.key -out client.csr 2>/dev/null
  # X.509 v3 (extensions): rustls refuses v1 certificates.
  printf 'extendedKeyUsage=clientAuth\n' > client.ext
  openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile client.ext -out client.crt 2>/dev/null
  # A CA the server's certificate does not chain to (a verify-ca test).
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=another CA" \
    -keyout other-ca.key -out other-ca.crt 2>/dev/null
  touch recipe-2
fi
# The server reads its key as the postgres user and refuses one others can read.
if id postgres >/dev/null 2>&1; then
  chown postgres:postgres server.key server.crt ca.crt
fi
chmod 600 server.key client.key
chmod 755 "$TLS_DIR"

"${PSQL[@]}" >/dev/null <<SQL
ALTER SYSTEM SET ssl = on;
ALTER SYSTEM SET ssl_cert_file = '$TLS_DIR/server.crt';
ALTER SYSTEM SET ssl_key_file = '$TLS_DIR/server.key';
ALTER SYSTEM SET ssl_ca_file = '$TLS_DIR/ca.crt';
SQL

hba="$("${PSQL[@]}" -c 'SHOW hba_file')"
if ! grep -qF "$MARK" "$hba"; then
  tmp="$(mktemp)"
  {
    echo "$MARK"
    echo "hostssl   test  pj_scram  127.0.0.1/32  scram-sha-256"
    echo "hostnossl test  pj_scram  127.0.0.1/32  reject"
    echo "hostssl   test  pj_cert   127.0.0.1/32  cert"
    echo "hostnossl test  pj_cert   127.0.0.1/32  reject"
    cat "$hba"
  } > "$tmp"
  cat "$tmp" > "$hba"
  rm -f "$tmp"
fi

"${PSQL[@]}" >/dev/null <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pj_scram') THEN
    CREATE ROLE pj_scram LOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pj_cert') THEN
    CREATE ROLE pj_cert LOGIN;
  END IF;
END $$;
SET password_encryption = 'scram-sha-256';
ALTER ROLE pj_scram PASSWORD 'pj-scram-secret';
GRANT CREATE ON DATABASE test TO pj_scram, pj_cert;
SELECT pg_reload_conf();
SQL

"${PSQL[@]}" >/dev/null <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pj_bouncer') THEN
    CREATE ROLE pj_bouncer LOGIN;
  END IF;
END $$;
ALTER ROLE pj_bouncer SET search_path = pj_bouncer;
CREATE SCHEMA IF NOT EXISTS pj_bouncer AUTHORIZATION pj_bouncer;
SQL

command -v pgbouncer >/dev/null || {
  apt-get update -qq >&2 && apt-get install -y -qq pgbouncer >/dev/null
}
BOUNCER_DIR="${PROJECTIONIST_TEST_PGBOUNCER_DIR:-/var/lib/postgresql/projectionist-pgbouncer}"
mkdir -p "$BOUNCER_DIR"
cat > "$BOUNCER_DIR/pgbouncer.ini" <<INI
[databases]
test = host=127.0.0.1 port=5432 dbname=test

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 6432
unix_socket_dir =
auth_type = trust
auth_file = $BOUNCER_DIR/userlist.txt
pool_mode = transaction
max_client_conn = 200
default_pool_size = 8
logfile = $BOUNCER_DIR/pgbouncer.log
pidfile = $BOUNCER_DIR/pgbouncer.pid
INI
echo '"pj_bouncer" ""' > "$BOUNCER_DIR/userlist.txt"
# PgBouncer refuses to run as root.
if id postgres >/dev/null 2>&1; then
  chown -R postgres:postgres "$BOUNCER_DIR"
  as_bouncer=(su postgres -s /bin/sh -c)
else
  as_bouncer=(sh -c)
fi
if [ -s "$BOUNCER_DIR/pgbouncer.pid" ] && kill -0 "$(cat "$BOUNCER_DIR/pgbouncer.pid")" 2>/dev/null; then
  kill -HUP "$(cat "$BOUNCER_DIR/pgbouncer.pid")"
else
  "${as_bouncer[@]}" "pgbouncer -d $BOUNCER_DIR/pgbouncer.ini"
fi
for _ in $(seq 1 50); do
  psql "host=127.0.0.1 port=6432 user=pj_bouncer dbname=test sslmode=disable" -qAtc 'SELECT 1' \
    >/dev/null 2>&1 && break
  sleep 0.2
done
psql "host=127.0.0.1 port=6432 user=pj_bouncer dbname=test sslmode=disable" -qAtc 'SELECT 1' >/dev/null \
  || { echo "PgBouncer on 127.0.0.1:6432 does not answer" >&2; exit 1; }

# The reload is asynchronous: wait until TLS with our certificate answers.
for _ in $(seq 1 50); do
  if PGSSLMODE=verify-full PGSSLROOTCERT="$TLS_DIR/ca.crt" PGPASSWORD=pj-scram-secret \
    psql "host=127.0.0.1 user=pj_scram dbname=test" -qAtc 'SELECT 1' >/dev/null 2>&1; then
    echo "$TLS_DIR"
    exit 0
  fi
  sleep 0.2
done
echo "PostgreSQL did not accept pj_scram over verified TLS after the setup" >&2
exit 1
