// Test-only LD_PRELOAD recorder of the file-system calls a vmdkit command makes under one
// folder (VMDKIT_CRASH_ROOT): creates, writes (with their bytes), truncations, punched
// holes, fsyncs of files and folders, renames, unlinks and mkdirs, appended in call
// order to VMDKIT_CRASH_LOG. tests/it/crash.rs replays prefixes of the log as the states
// a power cut may leave. copy_file_range and sendfile are refused (ENOSYS) so every byte
// goes through a recorded write (Rust's std falls back to read/write).
//
// Record: u32 length of what follows, u8 op, then the op's fields: paths as u32 length +
// bytes, numbers as u64, data as u32 length + bytes.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { OP_CREATE = 1, OP_WRITE = 2, OP_TRUNC = 3, OP_ZERO = 4, OP_FSYNC = 5,
       OP_RENAME = 6, OP_UNLINK = 7, OP_MKDIR = 8, OP_SYMLINK = 9 };

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int logfd = -2;
static char root[PATH_MAX];
static size_t rootlen;

static void init(void) {
    if (logfd != -2) return;
    const char *p = getenv("VMDKIT_CRASH_LOG");
    const char *r = getenv("VMDKIT_CRASH_ROOT");
    logfd = -1;
    if (!p || !r) return;
    if (!realpath(r, root)) return;
    rootlen = strlen(root);
    logfd = (int)syscall(SYS_openat, AT_FDCWD, p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

static void raw_write_all(const void *b, size_t n) {
    const char *c = b;
    while (n > 0) {
        long k = syscall(SYS_write, logfd, c, n);
        if (k <= 0) return;
        c += k;
        n -= (size_t)k;
    }
}

// Buffer of one record.
struct rec { char *b; size_t n, cap; };
static void put(struct rec *r, const void *p, size_t n) {
    if (r->n + n > r->cap) {
        r->cap = (r->n + n) * 2 + 64;
        r->b = realloc(r->b, r->cap);
    }
    memcpy(r->b + r->n, p, n);
    r->n += n;
}
static void put_u64(struct rec *r, uint64_t v) { put(r, &v, 8); }
static void put_bytes(struct rec *r, const void *p, size_t n) {
    uint32_t l = (uint32_t)n;
    put(r, &l, 4);
    put(r, p, n);
}
static void emit(struct rec *r) {
    uint32_t l = (uint32_t)r->n;
    raw_write_all(&l, 4);
    raw_write_all(r->b, r->n);
    free(r->b);
}

static int under_root(const char *abs) {
    return rootlen > 0 && strncmp(abs, root, rootlen) == 0 && (abs[rootlen] == '/' || abs[rootlen] == 0);
}

// The absolute path of an open descriptor.
static int fd_path(int fd, char *out) {
    char l[64];
    snprintf(l, sizeof l, "/proc/self/fd/%d", fd);
    long n = syscall(SYS_readlinkat, AT_FDCWD, l, out, PATH_MAX - 1);
    if (n <= 0) return 0;
    out[n] = 0;
    return out[0] == '/';
}

// The absolute path of a name (its folder resolved, the last component kept).
static int abs_path(int dirfd, const char *p, char *out) {
    char dir[PATH_MAX], tmp[PATH_MAX];
    const char *slash = strrchr(p, '/');
    const char *base = slash ? slash + 1 : p;
    if (slash) {
        size_t n = (size_t)(slash - p);
        if (n == 0) strcpy(tmp, "/");
        else { memcpy(tmp, p, n); tmp[n] = 0; }
    } else {
        strcpy(tmp, ".");
    }
    if (tmp[0] != '/' && dirfd != AT_FDCWD) {
        char d[PATH_MAX];
        if (!fd_path(dirfd, d)) return 0;
        char j[PATH_MAX];
        snprintf(j, sizeof j, "%s/%s", d, tmp);
        strcpy(tmp, j);
    }
    if (!realpath(tmp, dir)) return 0;
    snprintf(out, PATH_MAX, "%s/%s", strcmp(dir, "/") == 0 ? "" : dir, base);
    return 1;
}

static void rec_path_op(int op, const char *path) {
    struct rec r = {0};
    uint8_t o = (uint8_t)op;
    put(&r, &o, 1);
    put_bytes(&r, path, strlen(path));
    emit(&r);
}

#define REAL(ret, name, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

static int do_open(int dirfd, const char *path, int flags, mode_t mode,
                   int (*call)(int, const char *, int, mode_t)) {
    pthread_mutex_lock(&mu);
    init();
    char abs[PATH_MAX];
    int track = logfd >= 0 && abs_path(dirfd, path, abs) && under_root(abs);
    int existed = 1;
    if (track && (flags & O_CREAT) && !(flags & __O_TMPFILE)) {
        struct stat st;
        existed = fstatat(dirfd, path, &st, 0) == 0;
    }
    int fd = call(dirfd, path, flags, mode);
    if (fd >= 0 && track && !(flags & __O_TMPFILE)) {
        if (!existed) rec_path_op(OP_CREATE, abs);
        if ((flags & O_TRUNC) && (flags & O_ACCMODE) != O_RDONLY) {
            struct rec r = {0};
            uint8_t o = OP_TRUNC;
            put(&r, &o, 1);
            put_bytes(&r, abs, strlen(abs));
            put_u64(&r, 0);
            emit(&r);
        }
    }
    pthread_mutex_unlock(&mu);
    return fd;
}

static int call_openat(int d, const char *p, int f, mode_t m) {
    REAL(int, openat, int, const char *, int, ...);
    return real_openat(d, p, f, m);
}

int open(const char *p, int f, ...) {
    mode_t m = 0;
    if (f & (O_CREAT | __O_TMPFILE)) { va_list a; va_start(a, f); m = va_arg(a, int); va_end(a); }
    return do_open(AT_FDCWD, p, f, m, call_openat);
}
int open64(const char *p, int f, ...) {
    mode_t m = 0;
    if (f & (O_CREAT | __O_TMPFILE)) { va_list a; va_start(a, f); m = va_arg(a, int); va_end(a); }
    return do_open(AT_FDCWD, p, f, m, call_openat);
}
int openat(int d, const char *p, int f, ...) {
    mode_t m = 0;
    if (f & (O_CREAT | __O_TMPFILE)) { va_list a; va_start(a, f); m = va_arg(a, int); va_end(a); }
    return do_open(d, p, f, m, call_openat);
}
int openat64(int d, const char *p, int f, ...) {
    mode_t m = 0;
    if (f & (O_CREAT | __O_TMPFILE)) { va_list a; va_start(a, f); m = va_arg(a, int); va_end(a); }
    return do_open(d, p, f, m, call_openat);
}
int creat(const char *p, mode_t m) { return open(p, O_CREAT | O_WRONLY | O_TRUNC, m); }
int creat64(const char *p, mode_t m) { return open(p, O_CREAT | O_WRONLY | O_TRUNC, m); }

static void rec_write(int fd, const void *buf, size_t n, uint64_t off) {
    char abs[PATH_MAX];
    init();
    if (logfd < 0 || n == 0 || !fd_path(fd, abs) || !under_root(abs)) return;
    struct rec r = {0};
    uint8_t o = OP_WRITE;
    put(&r, &o, 1);
    put_bytes(&r, abs, strlen(abs));
    put_u64(&r, off);
    put_bytes(&r, buf, n);
    emit(&r);
}

ssize_t pwrite64(int fd, const void *b, size_t n, off_t off) {
    REAL(ssize_t, pwrite64, int, const void *, size_t, off_t);
    ssize_t k = real_pwrite64(fd, b, n, off);
    if (k > 0) { pthread_mutex_lock(&mu); rec_write(fd, b, (size_t)k, (uint64_t)off); pthread_mutex_unlock(&mu); }
    return k;
}
ssize_t pwrite(int fd, const void *b, size_t n, off_t off) { return pwrite64(fd, b, n, off); }

ssize_t write(int fd, const void *b, size_t n) {
    REAL(ssize_t, write, int, const void *, size_t);
    pthread_mutex_lock(&mu);
    off_t off = lseek(fd, 0, SEEK_CUR);
    ssize_t k = real_write(fd, b, n);
    if (k > 0 && off >= 0) {
        int fl = fcntl(fd, F_GETFL);
        if (fl >= 0 && (fl & O_APPEND)) {
            struct stat st;
            if (fstat(fd, &st) == 0) off = st.st_size - k;
        }
        rec_write(fd, b, (size_t)k, (uint64_t)off);
    }
    pthread_mutex_unlock(&mu);
    return k;
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    // Recorded as one write per buffer, in order.
    ssize_t total = 0;
    for (int i = 0; i < cnt; i++) {
        ssize_t k = write(fd, iov[i].iov_base, iov[i].iov_len);
        if (k < 0) return total ? total : k;
        total += k;
        if ((size_t)k < iov[i].iov_len) break;
    }
    return total;
}

static void rec_fd_num(int op, int fd, uint64_t a, uint64_t b, int two) {
    char abs[PATH_MAX];
    init();
    if (logfd < 0 || !fd_path(fd, abs) || !under_root(abs)) return;
    struct rec r = {0};
    uint8_t o = (uint8_t)op;
    put(&r, &o, 1);
    put_bytes(&r, abs, strlen(abs));
    put_u64(&r, a);
    if (two) put_u64(&r, b);
    emit(&r);
}

int ftruncate64(int fd, off_t len) {
    REAL(int, ftruncate64, int, off_t);
    int rc = real_ftruncate64(fd, len);
    if (rc == 0) { pthread_mutex_lock(&mu); rec_fd_num(OP_TRUNC, fd, (uint64_t)len, 0, 0); pthread_mutex_unlock(&mu); }
    return rc;
}
int ftruncate(int fd, off_t len) { return ftruncate64(fd, len); }

int fallocate64(int fd, int mode, off_t off, off_t len) {
    REAL(int, fallocate64, int, int, off_t, off_t);
    int rc = real_fallocate64(fd, mode, off, len);
    if (rc == 0) {
        pthread_mutex_lock(&mu);
        if (mode & 0x02 /* FALLOC_FL_PUNCH_HOLE */) {
            rec_fd_num(OP_ZERO, fd, (uint64_t)off, (uint64_t)len, 1);
        } else if (!(mode & 0x01 /* KEEP_SIZE */)) {
            struct stat st;
            if (fstat(fd, &st) == 0) rec_fd_num(OP_TRUNC, fd, (uint64_t)st.st_size, 0, 0);
        }
        pthread_mutex_unlock(&mu);
    }
    return rc;
}
int fallocate(int fd, int mode, off_t off, off_t len) { return fallocate64(fd, mode, off, len); }

static int do_sync(int fd, int rc) {
    if (rc == 0) { pthread_mutex_lock(&mu); rec_fd_num(OP_FSYNC, fd, 0, 0, 0); pthread_mutex_unlock(&mu); }
    return rc;
}
int fsync(int fd) { REAL(int, fsync, int); return do_sync(fd, real_fsync(fd)); }
int fdatasync(int fd) { REAL(int, fdatasync, int); return do_sync(fd, real_fdatasync(fd)); }

int renameat2(int d1, const char *a, int d2, const char *b, unsigned int flags) {
    REAL(int, renameat2, int, const char *, int, const char *, unsigned int);
    pthread_mutex_lock(&mu);
    char x[PATH_MAX], y[PATH_MAX];
    int ok = abs_path(d1, a, x) && abs_path(d2, b, y);
    int rc = real_renameat2(d1, a, d2, b, flags);
    if (rc == 0 && ok) {
        init();
        if (logfd >= 0 && (under_root(x) || under_root(y))) {
            struct rec r = {0};
            uint8_t o = OP_RENAME;
            put(&r, &o, 1);
            put_bytes(&r, x, strlen(x));
            put_bytes(&r, y, strlen(y));
            emit(&r);
        }
    }
    pthread_mutex_unlock(&mu);
    return rc;
}
int renameat(int d1, const char *a, int d2, const char *b) { return renameat2(d1, a, d2, b, 0); }
int rename(const char *a, const char *b) { return renameat2(AT_FDCWD, a, AT_FDCWD, b, 0); }

int unlinkat(int d, const char *p, int flags) {
    REAL(int, unlinkat, int, const char *, int);
    pthread_mutex_lock(&mu);
    char x[PATH_MAX];
    int ok = abs_path(d, p, x);
    int rc = real_unlinkat(d, p, flags);
    if (rc == 0 && ok && !(flags & AT_REMOVEDIR)) {
        init();
        if (logfd >= 0 && under_root(x)) rec_path_op(OP_UNLINK, x);
    }
    pthread_mutex_unlock(&mu);
    return rc;
}
int unlink(const char *p) { return unlinkat(AT_FDCWD, p, 0); }

int mkdirat(int d, const char *p, mode_t m) {
    REAL(int, mkdirat, int, const char *, mode_t);
    pthread_mutex_lock(&mu);
    int rc = real_mkdirat(d, p, m);
    char x[PATH_MAX];
    if (rc == 0) {
        init();
        if (logfd >= 0 && abs_path(d, p, x) && under_root(x)) rec_path_op(OP_MKDIR, x);
    }
    pthread_mutex_unlock(&mu);
    return rc;
}
int mkdir(const char *p, mode_t m) { return mkdirat(AT_FDCWD, p, m); }

int symlinkat(const char *target, int d, const char *p) {
    REAL(int, symlinkat, const char *, int, const char *);
    pthread_mutex_lock(&mu);
    int rc = real_symlinkat(target, d, p);
    char x[PATH_MAX];
    if (rc == 0) {
        init();
        if (logfd >= 0 && abs_path(d, p, x) && under_root(x)) {
            struct rec r = {0};
            uint8_t o = OP_SYMLINK;
            put(&r, &o, 1);
            put_bytes(&r, x, strlen(x));
            put_bytes(&r, target, strlen(target));
            emit(&r);
        }
    }
    pthread_mutex_unlock(&mu);
    return rc;
}
int symlink(const char *target, const char *p) { return symlinkat(target, AT_FDCWD, p); }

ssize_t copy_file_range(int a, loff_t *b, int c, loff_t *d, size_t e, unsigned int f) {
    (void)a; (void)b; (void)c; (void)d; (void)e; (void)f;
    errno = ENOSYS;
    return -1;
}
ssize_t sendfile(int a, int b, off_t *c, size_t d) {
    (void)a; (void)b; (void)c; (void)d;
    errno = ENOSYS;
    return -1;
}
ssize_t sendfile64(int a, int b, off_t *c, size_t d) { return sendfile(a, b, c, d); }
