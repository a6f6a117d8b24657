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
 * Anything else is "not proven". read() also lists, in the same pass, where each
 * member of the top object (and of the objects among their values, some levels down)
 * is in the canonical form, so the caller parses only the parts it needs.
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
    Py_ssize_t node;       /* the node its value was listed as (read()), or -1 */
} Member;

/* What read() lists of an object: its members in output order, each value's place
 * relative to the byte after the object's opening brace (an enclosing object's
 * reordering moves the whole object, so a relative place stays right), and the
 * node of a value that is an object listed one level further down. */
typedef struct {
    Py_ssize_t key, klen;   /* the key in the input (no escapes: the output's too) */
    Py_ssize_t start, end;  /* the value, relative */
    Py_ssize_t node;
} Entry;

typedef struct {
    Py_ssize_t first, count; /* its entries */
} Node;

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
    int levels;          /* objects listed this many levels down (read()); 0: none */
    Py_ssize_t last_node; /* the node the object just read was listed as, or -1 */
    Entry *entries;
    Py_ssize_t entry_count, entry_cap;
    Node *nodes;
    Py_ssize_t node_count, node_cap;
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

static int value(Scan *sc, int depth, int level);

/* List the object whose members are sc->members[base:] as a node (sc->last_node names
 * it). They are in output order by now, one after another from the byte after the
 * opening brace, a comma between two. */
static int list_object(Scan *sc, Py_ssize_t base)
{
    Py_ssize_t n = sc->count - base;
    if (grow((void **)&sc->entries, &sc->entry_cap, sc->entry_count + n, sizeof(Entry))
        || grow((void **)&sc->nodes, &sc->node_cap, sc->node_count + 1, sizeof(Node)))
        return NO_MEMORY;
    Entry *e = sc->entries + sc->entry_count;
    Py_ssize_t at = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        const Member *m = &sc->members[base + k];
        Py_ssize_t len = m->end - m->start;
        e[k] = (Entry){m->key, m->klen, at + m->klen + 3, at + len, m->node};
        at += len + 1; /* '"key":value' and the comma after it */
    }
    sc->nodes[sc->node_count] = (Node){sc->entry_count, n};
    sc->entry_count += n;
    sc->last_node = sc->node_count++;
    return PROVEN;
}

/* One object's members, written from output position `open` on in document order, are
 * checked (no duplicate, no keys equal but for case) and put in key order, the bytes
 * and sc->members[base:] alike (read() lists the members in that order). Called with
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
        if (ordered) { /* the bytes stay as they are: so do the members (in byte order) */
            sort_members(s, m, sc->scratch, n, 0);
            return PROVEN;
        }
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

/* An object; `level` > 0: listed (read()), its member values that are objects one
 * level further down while levels remain. */
static int object(Scan *sc, int depth, int level)
{
    int r, more;
    Py_ssize_t base = sc->count;
    if (opens_empty(sc, '}'))
        return level ? list_object(sc, base) : PROVEN;
    Py_ssize_t open = out_at(sc); /* skipping spaces keeps out_at */
    int capitals = 0; /* whether any key has one: only then can two fold together */
    int inner = level && level < sc->levels ? level + 1 : 0;
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
        sc->last_node = -1;
        if ((r = value(sc, depth + 1, inner)))
            return r;
        if (grow((void **)&sc->members, &sc->cap, sc->count + 1, sizeof(Member)))
            return NO_MEMORY;
        sc->members[sc->count++] = (Member){start, out_at(sc), key, klen,
                                            inner ? sc->last_node : -1};
    } while ((more = next_item(sc, '}')) > 0);
    if (more < 0)
        return NOT_PROVEN;
    r = reorder(sc, base, open, capitals);
    if (r == PROVEN && level)
        r = list_object(sc, base);
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
        if ((r = value(sc, depth + 1, 0)))
            return r;
    } while ((more = next_item(sc, ']')) > 0);
    if (more < 0)
        return NOT_PROVEN;
    sc->i++;
    return PROVEN;
}

static int value(Scan *sc, int depth, int level)
{
    if (depth >= MAX_DEPTH || sc->i >= sc->n)
        return NOT_PROVEN;
    unsigned char c = sc->s[sc->i];
    switch (c) {
    case '{': return object(sc, depth, level);
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

/* One pass over `data`: PROVEN with the canonical form in sc->out[:sc->len] (and, with
 * sc->levels, the objects listed), NOT_PROVEN, or NO_MEMORY. */
static int scan(Scan *sc, Py_buffer *view)
{
    sc->s = view->buf;
    sc->n = view->len;
    sc->last_node = -1;
    sc->out = PyMem_Malloc((size_t)sc->n + 1);
    if (sc->out == NULL)
        return NO_MEMORY;
    skip_ws(sc);
    int r = value(sc, 0, sc->levels ? 1 : 0);
    skip_ws(sc);
    flush(sc);
    if (r == PROVEN && sc->i != sc->n)
        r = NOT_PROVEN;
    return r;
}

static void scan_free(Scan *sc)
{
    PyMem_Free(sc->out);
    PyMem_Free(sc->members);
    PyMem_Free(sc->scratch);
    PyMem_Free(sc->copy);
    PyMem_Free(sc->entries);
    PyMem_Free(sc->nodes);
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
    int r = scan(&sc, &view);
    PyObject *result = NULL;
    if (r == PROVEN)
        result = PyBytes_FromStringAndSize(sc.out, sc.len);
    else if (r == NOT_PROVEN)
        result = Py_NewRef(Py_None);
    else
        PyErr_NoMemory();
    scan_free(&sc);
    PyBuffer_Release(&view);
    return result;
}

/* A listed object's members as (key, value start, value end, the value's members if
 * it is a listed object, else None); `base`: the output position after its opening
 * brace. */
static PyObject *build(const Scan *sc, Py_ssize_t node, Py_ssize_t base)
{
    const Node *nd = &sc->nodes[node];
    PyObject *list = PyList_New(nd->count);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < nd->count; k++) {
        const Entry *e = &sc->entries[nd->first + k];
        Py_ssize_t start = base + e->start, end = base + e->end;
        PyObject *sub = e->node >= 0 ? build(sc, e->node, start + 1) : Py_NewRef(Py_None);
        if (sub == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyObject *item = Py_BuildValue("(s#nnN)", (const char *)sc->s + e->key, e->klen,
                                       start, end, sub);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, item);
    }
    return list;
}

PyDoc_STRVAR(read_doc,
"read(data, levels, /)\n--\n\n"
"``(canonical(data), members)`` in one pass, or None when canonical() gives None.\n"
"``members``: the top object's members as (key, value start, value end, the value's\n"
"members or None) in the canonical bytes, nested ``levels`` deep through values that\n"
"are objects; None when the top value is not an object.");

static PyObject *scan_read(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "read(data: bytes, levels: int)");
        return NULL;
    }
    long levels = PyLong_AsLong(args[1]);
    if (levels == -1 && PyErr_Occurred())
        return NULL;
    if (levels < 1 || levels > MAX_DEPTH) {
        PyErr_SetString(PyExc_ValueError, "levels must be 1 to 128");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Scan sc = {0};
    sc.levels = (int)levels;
    int r = scan(&sc, &view);
    PyObject *result = NULL;
    if (r == PROVEN) {
        PyObject *canon = PyBytes_FromStringAndSize(sc.out, sc.len);
        /* the value read was an object (its first byte): its node is the last made */
        PyObject *members = sc.len && sc.out[0] == '{' ? build(&sc, sc.node_count - 1, 1)
                                                       : Py_NewRef(Py_None);
        if (canon != NULL && members != NULL)
            result = PyTuple_Pack(2, canon, members);
        Py_XDECREF(canon);
        Py_XDECREF(members);
    } else if (r == NOT_PROVEN) {
        result = Py_NewRef(Py_None);
    } else {
        PyErr_NoMemory();
    }
    scan_free(&sc);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"canonical", scan_canonical, METH_O, canonical_doc},
    {"read", (PyCFunction)(void (*)(void))scan_read, METH_FASTCALL, read_doc},
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
    return PyModuleDef_Init(&module);
}
