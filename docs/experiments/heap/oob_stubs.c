/* Experiment: OCaml values built by hand in a MAP_SHARED region outside
   OCaml's heap, referenced from private data while the private heap is
   collected and compacted. See ../../design-heap.md, section 1. */
#define CAML_INTERNALS
#define CAML_NAME_SPACE
#include <sys/mman.h>
#include <string.h>
#include <caml/mlvalues.h>
#include <caml/memory.h>
#include <caml/alloc.h>
#include <caml/fail.h>
#include <caml/address_class.h>

static char *region;            /* 1 MiB, MAP_SHARED|MAP_ANONYMOUS */
static size_t region_len = 1 << 20;
static size_t used;             /* bytes handed out */
static color_t colour;          /* colour written into every header */

/* (colour: 0 white / 3 black, register: bool) -> unit */
value oob_init(value vcol, value vreg)
{
  region = mmap(NULL, region_len, PROT_READ | PROT_WRITE,
                MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (region == MAP_FAILED) caml_failwith("mmap");
  colour = Int_val(vcol) << 8;
  if (Bool_val(vreg) &&
      caml_page_table_add(In_static_data, region, region + region_len) != 0)
    caml_failwith("caml_page_table_add");
  return Val_unit;
}

static value carve(mlsize_t wosize, tag_t tag)
{
  header_t *hp = (header_t *)(region + used);
  used += Bhsize_wosize(wosize);
  if (used > region_len) caml_failwith("region full");
  *hp = Make_header(wosize, tag, colour);
  return Val_hp(hp);
}

/* A block of [n] fields, tag 0, all fields = Val_unit; int -> 'a array */
value oob_block(value vn)
{
  value v = carve(Long_val(vn), 0);
  for (mlsize_t i = 0; i < (mlsize_t)Long_val(vn); i++) Field(v, i) = Val_unit;
  return v;
}

/* copies an OCaml string into the region: string -> string */
value oob_string(value s)
{
  mlsize_t len = caml_string_length(s);
  mlsize_t wosize = (len + sizeof(value)) / sizeof(value);
  value v = carve(wosize, String_tag);
  Field(v, wosize - 1) = 0;
  mlsize_t last = Bsize_wsize(wosize) - 1;
  Byte(v, last) = last - len;
  memcpy(Bytes_val(v), String_val(s), len);
  return v;
}

/* plain store without write barrier: 'a array -> int -> 'b -> unit */
value oob_raw_set(value b, value vi, value x)
{
  Field(b, Long_val(vi)) = x;
  return Val_unit;
}

/* checks that every header carved so far is intact: unit -> int (bad count) */
value oob_check_headers(value unit)
{
  long bad = 0;
  size_t off = 0;
  while (off < used) {
    header_t h = *(header_t *)(region + off);
    if (Color_hd(h) != colour || Wosize_hd(h) == 0 || Wosize_hd(h) > 4096) {
      bad++;
      break; /* cannot walk further */
    }
    off += Bhsize_hd(h);
  }
  return Val_long(bad);
}

value oob_classify(value v) { return Val_int(Classify_addr(v)); }
value oob_in_region(value v)
{
  return Val_bool(Is_block(v) && (char *)v >= region && (char *)v < region + region_len);
}
value oob_ref_table_len(value unit)
{
  return Val_long(Caml_state->ref_table->ptr - Caml_state->ref_table->base);
}
