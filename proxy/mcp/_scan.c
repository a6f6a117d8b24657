/* A fast path for the strict JSON-RPC reader (proxy/mcp/_jsonrpc.py): prove, in one
 * pass over the bytes and without building Python objects, that a body reads the
 * same under every parser, and write its canonical form (sorted keys, no spaces).
 *
 * It never refuses anything: it answers "proven" (the canonical bytes) or "not
 * proven" (None), and the Python reader, which decides and words every refusal,
 * takes everything it does not prove. So it proves only the plain case, where the
 * canonical form is the input's own bytes reordered:
 *   - ASCII only (no UTF-8 to validate, no Unicode folding beyond ASCII case);
 *   - no duplicate key and no two keys of one object equal but for ASCII case,
 *     at any depth;
 *   - keys without escapes; string values with only the escapes orjson writes the
 *     same way (\" \\ \b \f \n \r \t): no \u, no \/;
 *   - numbers without an exponent, at most 18 integer digits (no overflow, no
 *     rounding to a float), and no "-0" (read as the integer 0);
 *   - fewer than MAX_DEPTH levels of nesting (128 arrays in arrays, say), and no more
 *     than MAX_MOVED_PER_BYTE times its size moved by reordering (deep unsorted objects).
 * Anything else is "not proven". index() lists an object's members in such a
 * canonical form, so the caller parses only the parts it needs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_DEPTH 128
#define MAX_INT_DIGITS 18
#define MAX_FRAC_DIGITS 64
#define MAX_MOVED_PER_BYTE 16

enum { PROVEN = 0, NOT_PROVEN = 1, NO_MEMORY = 2 };

typedef struct {
    Py_ssize_t start, end; /* the member '"key":value' in the output */
    Py_ssize_t key, klen;  /* its key (without quotes) in the input */
} Member;

/* The output is the input without whitespace, each object's members then put in key
 * order. Bytes are copied lazily: input from `pending` up to `i` is not yet in `out`,
 * and is copied in one piece when whitespace (or a reordering) needs it there. So an
 * output position is known without copying (out_at), and a compact body whose keys
 * are in order is copied once, whole. */
typedef struct {
    const unsigned char *s;
    Py_ssize_t i, n, pending;
    char *out;           /* n + 1 bytes: the output is never longer than the input */
    Py_ssize_t len;
    Member *members;     /* the members of the objects open on the way down */
    Py_ssize_t count, cap;
    Member *scratch;     /* for sorting one object's members */
    Py_ssize_t scratch_cap;
    char *copy;          /* one object's bytes while they are reordered */
    Py_ssize_t copy_cap;
    Py_ssize_t moved;    /* bytes reordered so far, across every level */
} Scan;

static int grow(void **p, Py_ssize_t *cap, Py_ssize_t need, size_t size)
{
    if (need <= *cap)
        return PROVEN;
    Py_ssize_t cap2 = *cap ? *cap : 64;
    while (cap2 < need)
        cap2 *= 2;
    void *q = PyMem_Realloc(*p, (size_t)cap2 * size);
    if (q == NULL)
        return NO_MEMORY;
    *p = q;
    *cap = cap2;
    return PROVEN;
}

static inline Py_ssize_t out_at(const Scan *sc)
{
    return sc->len + (sc->i - sc->pending);
}

/* memcpy of k bytes, inlined for the short runs most copies here are (between two
 * spaces; one member of a small object): two fixed-size moves that may overlap, as
 * memcpy does inside, without its call (the calls were a fifth of a scan). Reads and
 * writes nothing outside the k bytes. */
static inline void copy(char *to, const char *from, Py_ssize_t k)
{
    if (k >= 16 && k <= 32) {
        memcpy(to, from, 16);
        memcpy(to + k - 16, from + k - 16, 16);
    } else if (k >= 8 && k < 16) {
        memcpy(to, from, 8);
        memcpy(to + k - 8, from + k - 8, 8);
    } else if (k >= 4 && k < 8) {
        memcpy(to, from, 4);
        memcpy(to + k - 4, from + k - 4, 4);
    } else if (k < 4) {
        for (Py_ssize_t j = 0; j < k; j++)
            to[j] = from[j];
    } else {
        memcpy(to, from, (size_t)k);
    }
}

static inline void flush(Scan *sc)
{
    Py_ssize_t k = sc->i - sc->pending;
    copy(sc->out + sc->len, (const char *)sc->s + sc->pending, k);
    sc->len += k;
    sc->pending = sc->i;
}

static inline int is_ws(unsigned char c)
{
    return c == ' ' || c == '\n' || c == '\r' || c == '\t';
}

static inline void skip_ws(Scan *sc)
{
    if (sc->i < sc->n && is_ws(sc->s[sc->i])) {
        flush(sc);
        do
            sc->i++;
        while (sc->i < sc->n && is_ws(sc->s[sc->i]));
        sc->pending = sc->i;
    }
}

/* Bytes a string's scan must stop at: a quote, a backslash, a control character, and
 * anything beyond ASCII. */
static unsigned char stop[256];

static void init_stop(void)
{
    for (int c = 0; c < 256; c++)
        stop[c] = c < 0x20 || c >= 0x80 || c == '"' || c == '\\';
}

/* A key at sc->i (its opening quote): no escapes; *capitals set if it has one. */
static inline int key_string(Scan *sc, int *capitals)
{
    const unsigned char *s = sc->s;
    Py_ssize_t i = sc->i + 1, n = sc->n;
    int caps = 0;
    while (i < n && !stop[s[i]]) {
        caps |= (unsigned)(s[i] - 'A') < 26u;
        i++;
    }
    if (i >= n || s[i] != '"')
        return NOT_PROVEN; /* an escape, a control character, a byte beyond ASCII */
    *capitals |= caps;
    sc->i = i + 1;
    return PROVEN;
}

/* A string value at sc->i (its opening quote). */
static int string(Scan *sc)
{
    const unsigned char *s = sc->s;
    Py_ssize_t i = sc->i + 1, n = sc->n;
    for (;;) {
        while (i < n && !stop[s[i]])
            i++;
        if (i >= n)
            return NOT_PROVEN;
        if (s[i] == '"') {
            sc->i = i + 1;
            return PROVEN;
        }
        if (s[i] != '\\' || i + 1 >= n)
            return NOT_PROVEN; /* a control character, a byte beyond ASCII */
        switch (s[i + 1]) {
        case '"': case '\\': case 'b': case 'f': case 'n': case 'r': case 't':
            i += 2;
            continue;
        default: /* \u and \/ are written differently by orjson; others are invalid */
            return NOT_PROVEN;
        }
    }
}

static Py_ssize_t digits(Scan *sc)
{
    Py_ssize_t start = sc->i;
    while (sc->i < sc->n && sc->s[sc->i] >= '0' && sc->s[sc->i] <= '9')
        sc->i++;
    return sc->i - start;
}

static int number(Scan *sc)
{
    int negative = sc->s[sc->i] == '-';
    if (negative)
        sc->i++;
    if (sc->i >= sc->n)
        return NOT_PROVEN;
    int zero = sc->s[sc->i] == '0';
    Py_ssize_t whole = digits(sc);
    if (whole == 0 || whole > MAX_INT_DIGITS || (zero && whole > 1))
        return NOT_PROVEN;
    int fraction = sc->i < sc->n && sc->s[sc->i] == '.';
    if (fraction) {
        sc->i++;
        Py_ssize_t frac = digits(sc);
        if (frac == 0 || frac > MAX_FRAC_DIGITS)
            return NOT_PROVEN;
    }
    if (sc->i < sc->n && (sc->s[sc->i] == 'e' || sc->s[sc->i] == 'E'))
        return NOT_PROVEN;
    if (negative && zero && !fraction)
        return NOT_PROVEN; /* "-0" reads as the integer 0 */
    return PROVEN;
}

static int literal(Scan *sc, const char *word, Py_ssize_t n)
{
    if (sc->n - sc->i < n || memcmp(sc->s + sc->i, word, (size_t)n) != 0)
        return NOT_PROVEN;
    sc->i += n;
    return PROVEN;
}

static inline int key_cmp(const unsigned char *s, const Member *x, const Member *y, int fold)
{
    const unsigned char *a = s + x->key, *b = s + y->key;
    Py_ssize_t n = x->klen < y->klen ? x->klen : y->klen;
    for (Py_ssize_t k = 0; k < n; k++) {
        int p = a[k], q = b[k];
        if (fold) {
            p = Py_TOLOWER(p);
            q = Py_TOLOWER(q);
        }
        if (p != q)
            return p - q;
    }
    return (x->klen > y->klen) - (x->klen < y->klen);
}

/* Stable sort of one object's members by key: insertion sort for the usual handful,
 * bottom-up merge sort beyond. */
static void sort_members(const unsigned char *s, Member *m, Member *tmp, Py_ssize_t n,
                         int fold)
{
    if (n <= 16) {
        for (Py_ssize_t k = 1; k < n; k++) {
            Member x = m[k];
            Py_ssize_t j = k;
            while (j > 0 && key_cmp(s, &m[j - 1], &x, fold) > 0) {
                m[j] = m[j - 1];
                j--;
            }
            m[j] = x;
        }
        return;
    }
    for (Py_ssize_t width = 1; width < n; width *= 2) {
        for (Py_ssize_t lo = 0; lo < n; lo += 2 * width) {
            Py_ssize_t mid = lo + width < n ? lo + width : n;
            Py_ssize_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            Py_ssize_t a = lo, b = mid, k = lo;
            while (a < mid && b < hi)
                tmp[k++] = key_cmp(s, &m[a], &m[b], fold) <= 0 ? m[a++] : m[b++];
            while (a < mid)
                tmp[k++] = m[a++];
            while (b < hi)
                tmp[k++] = m[b++];
        }
        memcpy(m, tmp, (size_t)n * sizeof(Member));
    }
}

static int value(Scan *sc, int depth);

/* One object's members, written from output position `open` on in document order, are
 * checked (no duplicate, no keys equal but for case) and put in key order. Called with
 * sc->i at the closing brace; `capitals`: whether one of its keys has a capital letter
 * (noted as the keys were read: only then can two of them fold together). */
static int reorder(Scan *sc, Py_ssize_t base, Py_ssize_t open, int capitals)
{
    Py_ssize_t n = sc->count - base;
    Member *m = sc->members + base;
    const unsigned char *s = sc->s;
    if (n < 2)
        return PROVEN;
    int ordered = 1;
    for (Py_ssize_t k = 1; k < n && ordered; k++)
        ordered = key_cmp(s, &m[k - 1], &m[k], 0) < 0;
    if (ordered && !capitals)
        return PROVEN; /* strictly increasing: no duplicate, nothing to move */
    if (grow((void **)&sc->scratch, &sc->scratch_cap, n, sizeof(Member)))
        return NO_MEMORY;
    if (capitals) {
        sort_members(s, m, sc->scratch, n, 1);
        for (Py_ssize_t k = 1; k < n; k++)
            if (key_cmp(s, &m[k - 1], &m[k], 1) == 0)
                return NOT_PROVEN;
        if (ordered)
            return PROVEN;
    }
    sort_members(s, m, sc->scratch, n, 0);
    for (Py_ssize_t k = 1; k < n; k++)
        if (key_cmp(s, &m[k - 1], &m[k], 0) == 0)
            return NOT_PROVEN;
    flush(sc);
    Py_ssize_t size = sc->len - open;
    /* Each level of unsorted objects moves what it holds again: bound the total (the
     * Python readers, linear, take a body nested to make that quadratic). */
    sc->moved += size;
    if (sc->moved > MAX_MOVED_PER_BYTE * sc->n + 65536)
        return NOT_PROVEN;
    if (grow((void **)&sc->copy, &sc->copy_cap, size, 1))
        return NO_MEMORY;
    memcpy(sc->copy, sc->out + open, (size_t)size);
    char *w = sc->out + open;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (k)
            *w++ = ',';
        Py_ssize_t len = m[k].end - m[k].start;
        copy(w, sc->copy + (m[k].start - open), len);
        w += len;
    }
    return PROVEN;
}

/* Past an opening brace or bracket: whether the container closes at once (then past it). */
static int opens_empty(Scan *sc, unsigned char close)
{
    sc->i++;
    skip_ws(sc);
    if (sc->i < sc->n && sc->s[sc->i] == close) {
        sc->i++;
        return 1;
    }
    return 0;
}

/* After a member or an element: 1 past a comma (another follows), 0 at the closing byte,
 * -1 at anything else. */
static int next_item(Scan *sc, unsigned char close)
{
    skip_ws(sc);
    if (sc->i >= sc->n)
        return -1;
    if (sc->s[sc->i] == ',') {
        sc->i++;
        return 1;
    }
    return sc->s[sc->i] == close ? 0 : -1;
}

static int object(Scan *sc, int depth)
{
    int r, more;
    if (opens_empty(sc, '}'))
        return PROVEN;
    Py_ssize_t open = out_at(sc), base = sc->count; /* skipping spaces keeps out_at */
    int capitals = 0; /* whether any key has one: only then can two fold together */
    do {
        skip_ws(sc);
        if (sc->i >= sc->n || sc->s[sc->i] != '"')
            return NOT_PROVEN;
        Py_ssize_t start = out_at(sc), key = sc->i + 1;
        if ((r = key_string(sc, &capitals)))
            return r;
        Py_ssize_t klen = sc->i - 1 - key;
        skip_ws(sc);
        if (sc->i >= sc->n || sc->s[sc->i] != ':')
            return NOT_PROVEN;
        sc->i++;
        skip_ws(sc);
        if ((r = value(sc, depth + 1)))
            return r;
        if (grow((void **)&sc->members, &sc->cap, sc->count + 1, sizeof(Member)))
            return NO_MEMORY;
        sc->members[sc->count++] = (Member){start, out_at(sc), key, klen};
    } while ((more = next_item(sc, '}')) > 0);
    if (more < 0)
        return NOT_PROVEN;
    r = reorder(sc, base, open, capitals);
    sc->count = base;
    sc->i++;
    return r;
}

static int array(Scan *sc, int depth)
{
    int r, more;
    if (opens_empty(sc, ']'))
        return PROVEN;
    do {
        skip_ws(sc);
        if ((r = value(sc, depth + 1)))
            return r;
    } while ((more = next_item(sc, ']')) > 0);
    if (more < 0)
        return NOT_PROVEN;
    sc->i++;
    return PROVEN;
}

static int value(Scan *sc, int depth)
{
    if (depth >= MAX_DEPTH || sc->i >= sc->n)
        return NOT_PROVEN;
    unsigned char c = sc->s[sc->i];
    switch (c) {
    case '{': return object(sc, depth);
    case '[': return array(sc, depth);
    case '"': return string(sc);
    case 't': return literal(sc, "true", 4);
    case 'f': return literal(sc, "false", 5);
    case 'n': return literal(sc, "null", 4);
    default:
        if (c == '-' || (c >= '0' && c <= '9'))
            return number(sc);
        return NOT_PROVEN;
    }
}

PyDoc_STRVAR(canonical_doc,
"canonical(data, /)\n--\n\n"
"The canonical JSON of ``data`` (sorted keys, no spaces) if it provably reads the\n"
"same under every parser, else None.");

static PyObject *scan_canonical(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Scan sc = {0};
    sc.s = view.buf;
    sc.n = view.len;
    sc.out = PyMem_Malloc((size_t)sc.n + 1);
    int r = sc.out == NULL ? NO_MEMORY : PROVEN;
    if (r == PROVEN) {
        skip_ws(&sc);
        r = value(&sc, 0);
        skip_ws(&sc);
        flush(&sc);
        if (r == PROVEN && sc.i != sc.n)
            r = NOT_PROVEN;
    }
    PyObject *result = NULL;
    if (r == PROVEN)
        result = PyBytes_FromStringAndSize(sc.out, sc.len);
    else if (r == NOT_PROVEN)
        result = Py_NewRef(Py_None);
    else
        PyErr_NoMemory();
    PyMem_Free(sc.out);
    PyMem_Free(sc.members);
    PyMem_Free(sc.scratch);
    PyMem_Free(sc.copy);
    PyBuffer_Release(&view);
    return result;
}

/* Bytes a skip through canonical bytes stops at inside a container. */
static unsigned char bracket[256];

static void init_bracket(void)
{
    bracket['"'] = bracket['{'] = bracket['}'] = bracket['['] = bracket[']'] = 1;
    bracket[0] = 1; /* a bytes object's terminating NUL: the end, without a bound check */
}

/* The end of the value at i in canonical bytes (no spaces, strings well formed), or -1.
 * s[end] is the NUL every bytes object ends with. */
static Py_ssize_t skip_value(const unsigned char *s, Py_ssize_t i, Py_ssize_t end)
{
    Py_ssize_t depth = 0;
    do {
        if (i >= end)
            return -1;
        unsigned char c = s[i];
        if (c == '"') { /* to the next quote not escaped: after an even run of backslashes */
            Py_ssize_t from = ++i;
            for (;;) {
                const unsigned char *q = memchr(s + i, '"', (size_t)(end - i));
                if (q == NULL)
                    return -1;
                Py_ssize_t at = q - s, b = at;
                while (b > from && s[b - 1] == '\\')
                    b--;
                i = at + 1;
                if (((at - b) & 1) == 0)
                    break;
            }
        } else if (c == '{' || c == '[') {
            depth++;
            i++;
        } else if (c == '}' || c == ']') {
            if (depth == 0)
                return -1;
            depth--;
            i++;
        } else if (depth == 0) {
            while (i < end && s[i] != ',' && s[i] != '}' && s[i] != ']')
                i++;
        } else {
            for (i++; !bracket[s[i]]; i++) /* stops at s[end] at the latest */
                ;
        }
    } while (depth > 0);
    return i;
}

/* The members of the object at s[*at] as a list of (key, start, end, members of the
 * value if it is an object and levels remain, else None); *at moves past the object. */
static PyObject *index_object(const unsigned char *s, Py_ssize_t *at, Py_ssize_t end,
                              long levels)
{
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    Py_ssize_t i = *at + 1;
    if (i < end && s[i] == '}') {
        *at = i + 1;
        return list;
    }
    for (;;) {
        if (i >= end || s[i] != '"')
            goto broken;
        Py_ssize_t key = i + 1;
        const unsigned char *q = memchr(s + key, '"', (size_t)(end - key));
        if (q == NULL)
            goto broken;
        Py_ssize_t kend = q - s, v = kend + 2, e = v;
        if (v >= end || s[kend + 1] != ':')
            goto broken;
        PyObject *sub;
        if (levels > 1 && s[v] == '{') {
            sub = index_object(s, &e, end, levels - 1);
            if (sub == NULL) {
                Py_DECREF(list);
                return NULL;
            }
        } else {
            e = skip_value(s, v, end);
            if (e <= v)
                goto broken;
            sub = Py_NewRef(Py_None);
        }
        PyObject *item = Py_BuildValue("(s#nnN)", (const char *)s + key, kend - key, v, e, sub);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
        if (e >= end)
            goto broken;
        if (s[e] == '}') {
            *at = e + 1;
            return list;
        }
        if (s[e] != ',')
            goto broken;
        i = e + 1;
    }
broken:
    Py_DECREF(list);
    PyErr_SetString(PyExc_ValueError, "not the output of canonical()");
    return NULL;
}

PyDoc_STRVAR(index_doc,
"index(canon, levels, /)\n--\n\n"
"The members of the object ``canon`` (canonical() output) as a list of (key, value\n"
"start, value end, members of the value or None), nested ``levels`` deep; None if\n"
"``canon`` is not an object.");

static PyObject *scan_index(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "index(canon: bytes, levels: int)");
        return NULL;
    }
    long levels = PyLong_AsLong(args[1]);
    if (levels == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t end = PyBytes_GET_SIZE(args[0]), at = 0;
    if (end < 1 || s[0] != '{' || levels < 1)
        Py_RETURN_NONE;
    PyObject *list = index_object(s, &at, end, levels);
    if (list != NULL && at != end) {
        Py_DECREF(list);
        PyErr_SetString(PyExc_ValueError, "not the output of canonical()");
        return NULL;
    }
    return list;
}

static PyMethodDef methods[] = {
    {"canonical", scan_canonical, METH_O, canonical_doc},
    {"index", (PyCFunction)(void (*)(void))scan_index, METH_FASTCALL, index_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef_Slot slots[] = {
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy.mcp._scan",
    "Proves a JSON body plain and writes its canonical form, for the strict reader.",
    0, methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scan(void)
{
    init_stop();
    init_bracket();
    return PyModuleDef_Init(&module);
}
