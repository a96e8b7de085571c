#!/bin/sh
# Runs once, when the postgres container starts on an EMPTY data volume (the postgres image runs
# every script in /docker-entrypoint-initdb.d then). It creates one login role and one database
# per server, so the Prefect server cannot read MLflow's tables and the other way round:
#   prefect / PREFECT_DB_PASSWORD -> database prefect
#   mlflow  / MLFLOW_DB_PASSWORD  -> database mlflow (tracking store and the basic-auth users)
# Passwords reach psql as variables (:'name' quotes them), never as part of the SQL text.
# To change them later use ALTER ROLE: this script does not run again on an existing volume.
set -eu

: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v prefect_password="$PREFECT_DB_PASSWORD" -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
SQL
