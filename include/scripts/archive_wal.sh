#!/bin/sh
# archive_wal.sh: PostgreSQL archive_command. Copies one finished WAL file into
# the local WAL archive, durably, and never overwrites.
#
#   archive_command = '/opt/erp-backup/archive_wal.sh %p %f /backup/postgres/wal_archive'
#
# The archive directory is the 3rd argument, else $ERP_WAL_ARCHIVE_DIR, else
# $ERP_BACKUP_ROOT/postgres/wal_archive. Exit 0 only once the file, its
# directory entry and its archive.log line are on disk. If the file is already
# archived: exit 0 when the bytes are identical, 1 when they differ.
# archive.log gets one line per archived file, appended after the durable copy:
#   <UTC time, ISO 8601> <file name> <sha256> <size in bytes>
# Failures go to stderr, which PostgreSQL writes to its server log.
# POSIX sh plus cmp, sha256sum, stat -c, sync FILE (GNU coreutils >= 8.24 or busybox).
#
# Sealed archive: with $ERP_WAL_RECIPIENTS_FILE set (age recipients, one per line:
# the plan's public keys), a WAL segment is stored as <file name>.zst.age, compressed
# with zstd and encrypted with age, so no WAL content is on the archive disk in clear.
# Its line gets three more fields: the stored form and that file's sha256 and size;
# the first four still describe the WAL file itself.
#   <time> <file name> <sha256> <size> zst.age <stored sha256> <stored size>
# History and backup-label files (LSNs and labels, no table data) stay in clear:
# the WAL job reads the history files, and holds no private key to open them.
# A sealed file with no archive.log line is an unfinished earlier attempt: it is
# sealed again. With a line, the WAL file's sha256 decides identical or different.
# Sealing needs zstd and age (Debian's `age` package) on the database host.

set -u
# Files 0640: the backup worker reads them through the archive directory's group (setgid dir, docs/pitr.md).
umask 027

prog=archive_wal.sh
fail() {
    echo "$prog: ERROR: $*" >&2
    exit 1
}

[ $# -ge 2 ] || fail "usage: $prog <%p: path of the WAL file> <%f: its file name> [archive dir]"
source_path=$1
file_name=$2
if [ $# -ge 3 ] && [ -n "$3" ]; then
    archive_dir=$3
elif [ -n "${ERP_WAL_ARCHIVE_DIR:-}" ]; then
    archive_dir=$ERP_WAL_ARCHIVE_DIR
elif [ -n "${ERP_BACKUP_ROOT:-}" ]; then
    archive_dir=$ERP_BACKUP_ROOT/postgres/wal_archive
else
    fail "no archive directory: pass it as the 3rd argument of archive_command, or set ERP_WAL_ARCHIVE_DIR or ERP_BACKUP_ROOT in the server's environment"
fi

case $file_name in
    ''|*/*|.*) fail "refusing file name '$file_name' (%f must be a bare WAL file name)" ;;
esac
[ -f "$source_path" ] || fail "$file_name: source $source_path does not exist (cwd $(pwd))"
[ -d "$archive_dir" ] || fail "archive directory $archive_dir does not exist: create it, writable by the server's OS user"

log_file=$archive_dir/archive.log
recipients=${ERP_WAL_RECIPIENTS_FILE:-}
sealed=
case $file_name in
    *.history|*.backup) ;;
    *) [ -n "$recipients" ] && sealed=zst.age ;;
esac
if [ -n "$sealed" ]; then
    [ -r "$recipients" ] || fail "ERP_WAL_RECIPIENTS_FILE $recipients is not a readable file (age recipients, one per line)"
    grep -q '^age1' "$recipients" || fail "ERP_WAL_RECIPIENTS_FILE $recipients holds no age recipient (age1...)"
    command -v zstd >/dev/null || fail "zstd is not installed on this host; sealing needs it"
    command -v age >/dev/null || fail "age is not installed on this host (Debian package age); sealing needs it"
    target=$archive_dir/$file_name.$sealed
else
    target=$archive_dir/$file_name
fi

# Record the archive time of a file that is in the archive but not yet in the log.
record() {
    if [ -f "$log_file" ] && grep -qF " $file_name " "$log_file"; then
        return 0
    fi
    hashed=$(sha256sum "$target") || fail "$file_name: cannot hash $target"
    sum=${hashed%% *}
    size=$(stat -c %s "$target") || fail "$file_name: cannot stat $target"
    stored=
    if [ -n "$sealed" ]; then
        stored=" $sealed $sum $size"
        hashed=$(sha256sum "$source_path") || fail "$file_name: cannot hash $source_path"
        sum=${hashed%% *}
        size=$(stat -c %s "$source_path") || fail "$file_name: cannot stat $source_path"
    fi
    stamp=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
    case $stamp in *N*|*%*) stamp=$(date -u +%Y-%m-%dT%H:%M:%SZ) ;; esac  # date without %N
    printf '%s %s %s %s%s\n' "$stamp" "$file_name" "$sum" "$size" "$stored" >>"$log_file" \
        || fail "$file_name: cannot append to $log_file"
    sync "$log_file" || fail "$file_name: fsync of $log_file failed"
}

# The WAL file's sha256 as archive.log records it, if it has a line.
logged_sum() {
    [ -f "$log_file" ] || return 0
    # "" forces a string comparison: awk compares numeric-looking WAL names as (rounded) numbers.
    awk -v name="$file_name" '($2 "") == (name "") { print $3; exit }' "$log_file"
}

# A logged name is archived, in clear or sealed, whichever mode this call is in.
logged=$(logged_sum)
if [ -n "$logged" ]; then
    hashed=$(sha256sum "$source_path") || fail "$file_name: cannot hash $source_path"
    if [ "${hashed%% *}" = "$logged" ]; then
        echo "$prog: $file_name is already archived with identical content; nothing to do" >&2
        exit 0
    fi
    fail "$file_name is already archived in $archive_dir with DIFFERENT content (archive.log has sha256 $logged); refusing to overwrite. Is a second server archiving into the same directory, or was the cluster restored without a new timeline? Investigate before moving it aside"
fi
if [ -n "$sealed" ] && [ -e "$target" ]; then
    echo "$prog: $file_name: $target has no archive.log line (an unfinished earlier attempt); sealing it again" >&2
fi

if [ -z "$sealed" ] && [ -e "$target" ]; then
    if cmp -s "$source_path" "$target"; then
        echo "$prog: $file_name is already archived with identical content; nothing to do" >&2
        record
        exit 0
    fi
    fail "$file_name is already archived in $archive_dir with DIFFERENT content; refusing to overwrite. Is a second server archiving into the same directory, or was the cluster restored without a new timeline? Investigate before moving $target aside"
fi

tmp=$archive_dir/.$file_name.tmp.$$
zstd_status=$archive_dir/.$file_name.zstd.$$
trap 'rm -f "$tmp" "$zstd_status"' EXIT
if [ -n "$sealed" ]; then
    # POSIX sh has no pipefail: zstd's exit status comes back through a file.
    { zstd -q -c --no-progress -- "$source_path"; echo $? >"$zstd_status"; } \
        | age -e -R "$recipients" -o "$tmp" || fail "$file_name: age encryption into $tmp failed (disk full? bad recipients file?)"
    [ "$(cat "$zstd_status" 2>/dev/null)" = 0 ] || fail "$file_name: zstd compression of $source_path failed"
    [ "$(head -c 21 "$tmp")" = "age-encryption.org/v1" ] || fail "$file_name: $tmp is not an age file"
else
    cp "$source_path" "$tmp" || fail "$file_name: copy to $tmp failed (disk full? permissions?)"
fi
# cp keeps the source's mode under the umask, and PostgreSQL writes its segments 0600.
chmod 0640 "$tmp" || fail "$file_name: chmod of $tmp failed"
sync "$tmp" || fail "$file_name: fsync of $tmp failed"
if [ -n "$sealed" ]; then
    # Nothing logged this name (checked above), so a sealed file there is an unfinished attempt.
    mv -f "$tmp" "$target" || fail "$file_name: cannot move $tmp to $target"
elif ! ln "$tmp" "$target" 2>/dev/null; then
    # A hard link is an atomic "create if absent": it never replaces an existing file.
    if [ -e "$target" ] && cmp -s "$tmp" "$target"; then
        echo "$prog: $file_name was archived concurrently with identical content" >&2
    else
        fail "$file_name: cannot create $target (exists with different content, or the directory is not writable)"
    fi
fi
rm -f "$tmp"
sync "$archive_dir" || fail "$file_name: fsync of directory $archive_dir failed"
record
exit 0
