#!/usr/bin/env bash
# Restore a GitLab backup prepared by erp_backup.services.gitlab.restore() (runbook script).
#
# The prepared directory holds <id>_gitlab_backup.tar, gitlab-secrets.json and gitlab.rb.
# Steps, in GitLab's documented order:
#   1. check that GitLab here is the version and edition the backup was made with
#   2. put back gitlab-secrets.json and gitlab.rb (the current ones are kept as *.before-restore-<time>)
#   3. copy the backup tar into GitLab's backups directory
#   4. gitlab-ctl reconfigure
#   5. gitlab-ctl stop puma; gitlab-ctl stop sidekiq
#   6. GITLAB_ASSUME_YES=1 [DECOMPRESS_CMD=...] gitlab-backup restore BACKUP=<id>
#   7. gitlab-ctl restart
#   8. gitlab-rake gitlab:check SANITIZE=true
#   9. gitlab-rake gitlab:doctor:secrets (read its output: any failure means the secrets do not match)
# Every step is safe to repeat, so after fixing a failure rerun the whole script.
set -euo pipefail

PROG=$(basename "$0")

usage() {
    cat <<EOF
Usage: $PROG --mode docker|local --from DIR --backup-id ID --expected-version VERSION
                 (--dry-run | --yes) [options]

Restores GitLab from DIR (prepared by the gitlab service's restore()). DESTROYS the data of the
GitLab it targets and replaces its gitlab-secrets.json and gitlab.rb.

Required:
  --mode docker|local        docker: 'docker exec'/'docker cp' into --container; local: this Omnibus host
  --from DIR                 directory with <ID>_gitlab_backup.tar, gitlab-secrets.json, gitlab.rb
  --backup-id ID             GitLab's backup id (the tar is <ID>_gitlab_backup.tar)
  --expected-version TEXT    first line of version-manifest.txt when backed up, e.g. 'gitlab-ce 17.5.1'
  --dry-run | --yes          print every step without running it | really restore

Options:
  --container NAME           GitLab container in docker mode (default: ops-gitlab)
  --decompress-cmd CMD       DECOMPRESS_CMD for gitlab-backup restore (needed when the backup used zstd)
  --backups-dir PATH         GitLab's backup_path (default: /var/opt/gitlab/backups)
  --config-dir PATH          (default: /etc/gitlab)
  --version-manifest PATH    (default: /opt/gitlab/version-manifest.txt)
  --gitlab-backup-cmd CMD    (default: gitlab-backup)
  --gitlab-ctl-cmd CMD       (default: gitlab-ctl)
  --gitlab-rake-cmd CMD      (default: gitlab-rake)
  --owner USER:GROUP         owner of the copied tar (default: git:git; '' to leave it)
  -h, --help                 show this help
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

usage_error() {
    echo "$PROG: $*" >&2
    echo "Run '$PROG --help' for usage." >&2
    exit 2
}

MODE="" FROM="" BACKUP_ID="" EXPECTED_VERSION="" DECOMPRESS_CMD="" DRY_RUN="" CONTAINER=ops-gitlab
BACKUPS_DIR=/var/opt/gitlab/backups CONFIG_DIR=/etc/gitlab VERSION_MANIFEST=/opt/gitlab/version-manifest.txt
GITLAB_BACKUP=gitlab-backup GITLAB_CTL=gitlab-ctl GITLAB_RAKE=gitlab-rake OWNER=git:git

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1; shift; continue ;;
        --yes) DRY_RUN=0; shift; continue ;;
    esac
    [ $# -ge 2 ] || usage_error "$1 needs a value"
    case $1 in
        --mode) MODE=$2 ;;
        --from) FROM=$2 ;;
        --backup-id) BACKUP_ID=$2 ;;
        --expected-version) EXPECTED_VERSION=$2 ;;
        --decompress-cmd) DECOMPRESS_CMD=$2 ;;
        --container) CONTAINER=$2 ;;
        --backups-dir) BACKUPS_DIR=$2 ;;
        --config-dir) CONFIG_DIR=$2 ;;
        --version-manifest) VERSION_MANIFEST=$2 ;;
        --gitlab-backup-cmd) GITLAB_BACKUP=$2 ;;
        --gitlab-ctl-cmd) GITLAB_CTL=$2 ;;
        --gitlab-rake-cmd) GITLAB_RAKE=$2 ;;
        --owner) OWNER=$2 ;;
        *) usage_error "unknown option $1" ;;
    esac
    shift 2
done

case $MODE in
    docker | local) ;;
    "") usage_error "--mode is required (docker or local)" ;;
    *) usage_error "--mode must be docker or local, not '$MODE'" ;;
esac
[ -n "$FROM" ] || usage_error "--from DIR is required"
[ -n "$BACKUP_ID" ] || usage_error "--backup-id is required"
[ -n "$EXPECTED_VERSION" ] || usage_error "--expected-version is required (a restore needs the same GitLab version)"
[ -n "$DRY_RUN" ] || usage_error "pass --dry-run to see the steps, or --yes to restore (this replaces GitLab's data)"
[ "$MODE" = local ] || [ -n "$CONTAINER" ] || usage_error "--container is required in docker mode"

TAR_NAME="${BACKUP_ID}_gitlab_backup.tar"
for name in "$TAR_NAME" gitlab-secrets.json gitlab.rb; do
    [ -f "$FROM/$name" ] || die "$FROM/$name is missing: prepare the directory with the gitlab service's restore() first"
done

if [ "$DRY_RUN" = 0 ]; then
    if [ "$MODE" = docker ]; then
        command -v docker >/dev/null || die "docker CLI not found; run this on the Docker host of $CONTAINER"
    else
        for tool in "$GITLAB_BACKUP" "$GITLAB_CTL" "$GITLAB_RAKE"; do
            command -v "$tool" >/dev/null || die "$tool not found; is this the GitLab Omnibus host? (see --gitlab-*-cmd)"
        done
    fi
fi

STEP=0
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
report_failure() {
    local status=$?
    [ "$status" -eq 0 ] ||
        echo "$PROG: step $STEP failed (exit $status); GitLab may be partly restored. Fix the cause and rerun." >&2
}
trap report_failure EXIT

step() {
    STEP=$((STEP + 1))
    echo "[$STEP] $*"
}

show() {
    printf '    +'
    printf ' %q' "$@"
    printf '\n'
}

run() {
    show "$@"
    [ "$DRY_RUN" = 1 ] || "$@"
}

# Sets CMD to run "$@" where GitLab runs; leading VAR=VALUE words become its environment.
where() {
    local env_args=()
    while [ $# -gt 0 ] && [[ $1 == [A-Z_]*=* ]]; do
        env_args+=("$1")
        shift
    done
    if [ "$MODE" = docker ]; then
        CMD=(docker exec)
        for pair in "${env_args[@]+"${env_args[@]}"}"; do CMD+=(-e "$pair"); done
        CMD+=("$CONTAINER" "$@")
    elif [ ${#env_args[@]} -gt 0 ]; then
        CMD=(env "${env_args[@]}" "$@")
    else
        CMD=("$@")
    fi
}

in_gitlab() {
    where "$@"
    run "${CMD[@]}"
}

# Copy a prepared file into GitLab with a mode and (optional) owner.
put_file() {
    local source=$1 destination=$2 mode=$3 owner=$4
    if [ "$MODE" = docker ]; then
        run docker cp "$source" "$CONTAINER:$destination"
    else
        run cp -- "$source" "$destination"
    fi
    in_gitlab chmod "$mode" "$destination"
    [ -z "$owner" ] || in_gitlab chown "$owner" "$destination"
}

keep_current() {
    # shellcheck disable=SC2016  # $1 and $2 expand in the inner shell
    in_gitlab sh -c 'if [ -e "$1" ]; then cp -p "$1" "$1.before-restore-$2"; fi' sh "$1" "$STAMP"
}

TARGET_TEXT="this host"
[ "$MODE" = local ] || TARGET_TEXT="container $CONTAINER"
echo "Restoring GitLab backup $BACKUP_ID ($EXPECTED_VERSION) from $FROM into $TARGET_TEXT"
[ "$DRY_RUN" = 0 ] || echo "DRY RUN: every step is printed, nothing is changed"

step "check that GitLab here is '$EXPECTED_VERSION' (a restore needs the same version and edition)"
where head -n 1 "$VERSION_MANIFEST"
show "${CMD[@]}"
if [ "$DRY_RUN" = 0 ]; then
    actual=$("${CMD[@]}") || die "cannot read $VERSION_MANIFEST (is GitLab installed here? see --version-manifest)"
    [ "$actual" = "$EXPECTED_VERSION" ] ||
        die "GitLab here is '$actual' but the backup was made by '$EXPECTED_VERSION': install exactly that version and edition first"
    echo "    GitLab is $actual"
fi

step "put back gitlab-secrets.json and gitlab.rb (without them encrypted data is lost)"
for name in gitlab-secrets.json gitlab.rb; do
    keep_current "$CONFIG_DIR/$name"
    put_file "$FROM/$name" "$CONFIG_DIR/$name" 0600 ""
done

step "copy $TAR_NAME into $BACKUPS_DIR"
put_file "$FROM/$TAR_NAME" "$BACKUPS_DIR/$TAR_NAME" 0600 "$OWNER"

step "reconfigure GitLab with the restored configuration"
in_gitlab "$GITLAB_CTL" reconfigure

step "stop puma and sidekiq (the processes connected to the database)"
in_gitlab "$GITLAB_CTL" stop puma
in_gitlab "$GITLAB_CTL" stop sidekiq

step "restore backup $BACKUP_ID${DECOMPRESS_CMD:+ (DECOMPRESS_CMD=$DECOMPRESS_CMD)}"
if [ -n "$DECOMPRESS_CMD" ]; then
    in_gitlab GITLAB_ASSUME_YES=1 "DECOMPRESS_CMD=$DECOMPRESS_CMD" "$GITLAB_BACKUP" restore "BACKUP=$BACKUP_ID"
else
    in_gitlab GITLAB_ASSUME_YES=1 "$GITLAB_BACKUP" restore "BACKUP=$BACKUP_ID"
fi

step "restart GitLab"
in_gitlab "$GITLAB_CTL" restart

step "check GitLab"
in_gitlab "$GITLAB_RAKE" gitlab:check SANITIZE=true

step "check that the secrets decrypt the restored data"
in_gitlab "$GITLAB_RAKE" gitlab:doctor:secrets

if [ "$DRY_RUN" = 1 ]; then
    echo "Dry run finished: $STEP steps printed, nothing was changed."
else
    echo "GitLab backup $BACKUP_ID restored. Read the gitlab:doctor:secrets output above for failures."
    echo "Then delete $FROM: it holds gitlab-secrets.json in plain text."
fi
