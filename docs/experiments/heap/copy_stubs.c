/* Cost experiment: the copy-in of a value graph into a shared region
   (validation/size pass + copy pass, sharing kept through an open-addressing
   map, black headers, bump allocation), under a robust process-shared mutex.
   Only to size the design; not the implementation. */
#define CAML_NAME_SPACE
#define CAML_INTERNALS
#include <sys/mman.h>
#include <pthread.h>
#include <string.h>
#include <stdint.h>
#include <caml/mlvalues.h>
#include <caml/fail.h>
#include <caml/gc.h>
#include <caml/address_class.h>

static char *region; static size_t region_len = 64 << 20, used;
static pthread_mutex_t *mx;

#define MAPCAP 4096                 /* enough for the experiment's values */
static value map_src[MAPCAP]; static uintnat map_dst[MAPCAP];
static value todo[MAPCAP]; static int ntodo;

static inline uintnat slot(value v) { return ((uintnat)v * 0x9E3779B97F4A7C15ull) >> 52; }

value cp_init(value unit)
{
  region = mmap(NULL, region_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  /* as Netmcore's value_area: compare/hash/marshal then see the values */
  caml_page_table_add(In_static_data, region, region + region_len);
  mx = (pthread_mutex_t *)region; used = 64;
  pthread_mutexattr_t a; pthread_mutexattr_init(&a);
  pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(mx, &a);
  return Val_unit;
}

/* returns the copy, or Val_int(-1) for a refused value; noalloc */
value cp_add(value v)
{
  if (Is_long(v)) return v;
  if (pthread_mutex_lock(mx) != 0) return Val_int(-2);
  if (used > region_len / 2) used = 64;           /* the experiment recycles */
  int used_slots[MAPCAP]; int nused = 0;
  /* pass 1: refuse bad tags, assign destinations, keep sharing */
  uintnat words = 0; ntodo = 0; todo[ntodo++] = v;
  while (ntodo > 0) {
    value s = todo[--ntodo];
    uintnat h = slot(s);
    while (map_src[h] != 0 && map_src[h] != s) h = (h + 1) & (MAPCAP - 1);
    if (map_src[h] == s) continue;
    tag_t t = Tag_val(s);
    if (t == Closure_tag || t == Object_tag || t == Lazy_tag || t == Abstract_tag ||
        t == Custom_tag || t == Infix_tag || t == Forward_tag) {
      for (int i = 0; i < nused; i++) map_src[used_slots[i]] = 0;
      pthread_mutex_unlock(mx); return Val_int(-1);
    }
    map_src[h] = s; map_dst[h] = words + 1; used_slots[nused++] = h;
    words += Whsize_val(s);
    if (t < No_scan_tag)
      for (mlsize_t i = Wosize_val(s); i-- > 0;) {
        value f = Field(s, i);
        if (Is_block(f) && Wosize_val(f) > 0) todo[ntodo++] = f;
      }
  }
  /* pass 2: copy each block, translating pointers */
  value *base = (value *)(region + used);
  for (int i = 0; i < nused; i++) {
    value s = map_src[used_slots[i]];
    value *d = base + map_dst[used_slots[i]];
    mlsize_t n = Wosize_val(s);
    d[-1] = Make_header(n, Tag_val(s), 3 << 8);    /* black */
    if (Tag_val(s) < No_scan_tag) {
      for (mlsize_t k = 0; k < n; k++) {
        value f = Field(s, k);
        if (Is_block(f) && Wosize_val(f) > 0) {
          uintnat h = slot(f);
          while (map_src[h] != f) h = (h + 1) & (MAPCAP - 1);
          f = (value)(base + map_dst[h]);
        }
        d[k] = f;
      }
    } else memcpy(d, (void *)s, n * sizeof(value));
  }
  value r;
  { uintnat h = slot(v); while (map_src[h] != v) h = (h + 1) & (MAPCAP - 1); r = (value)(base + map_dst[h]); }
  for (int i = 0; i < nused; i++) map_src[used_slots[i]] = 0;
  used += words * sizeof(value);
  pthread_mutex_unlock(mx);
  return r;
}

value cp_lock_unlock(value unit)
{
  pthread_mutex_lock(mx); pthread_mutex_unlock(mx); return Val_unit;
}
