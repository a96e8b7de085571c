#!/bin/sh
# One-shot check before anything starts (the `preflight` service in compose.yaml): every secret
# must be set (compose already refuses unset or empty ones) and must not still be a placeholder
# from .env.example. Prints the names of bad variables, never their values.
set -eu
bad=0
for name in POSTGRES_PASSWORD PREFECT_DB_PASSWORD MLFLOW_DB_PASSWORD PREFECT_AUTH_STRING \
            MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SECRET_KEY; do
    value=$(printenv "$name" || true)
    case "$value" in
        "" | *REPLACE_ME*)
            echo "preflight: $name is still the placeholder from docker/.env.example (or empty): set it in docker/.env" >&2
            bad=1 ;;
    esac
    if [ "${#value}" -lt 12 ]; then
        echo "preflight: $name is shorter than 12 characters" >&2
        bad=1
    fi
done
case "$PREFECT_AUTH_STRING" in
    *:*) ;;
    *) echo "preflight: PREFECT_AUTH_STRING must be user:password" >&2; bad=1 ;;
esac
[ "$bad" -eq 0 ] && echo "preflight: secrets look set"
exit "$bad"
