(* Netmcore_buffer on our heap.

   The root holds the header, the block size and the current state, an
   immutable record: [base] is the eternal position of the first byte of
   [blocks.(0)] (a multiple of the block size), the valid bytes are the
   positions [start] to [start + length - 1], all within the blocks.

   Crash safety: every change commits with one store of a new state.
   [add_*] first writes the new bytes past the valid end (into the free
   tail of the last block and into fresh blocks), invisible until the new
   state, which counts them, is stored; [delete_hd] and [clear] only store
   a new state. A writer killed anywhere leaves the old or the new state;
   the bytes it had written past the end are overwritten by the next add.

   A change builds only its new small values, in the heap, from parts
   already there ([new_state], [new_blocks]): [Heap.add] would copy the
   blocks too, the whole buffer at every change.

   Readers take the state once, pinned ([Heap.with_value]), so they see the
   buffer as it was when they started, and its blocks cannot be reclaimed
   while they copy. *)

type state = { base : int; start : int; length : int; blocks : Bytes.t array }
type 'h root = { mutable st : state; bsize : int; header : 'h }
type 'h buffer = 'h root Heap.heap
type 'h buffer_descr = 'h root Heap.descr

let empty = { base = 0; start = 0; length = 0; blocks = [||] }

(* A state record in the mutator's heap whose [blocks] is already there
   (or the empty array, an atom): nothing is copied. *)
let new_state m ~base ~start ~length (blocks : Bytes.t array) : state =
  let r = Heap.block m 4 0 in
  Obj.set_field r 0 (Obj.repr base);
  Obj.set_field r 1 (Obj.repr start);
  Obj.set_field r 2 (Obj.repr length);
  Obj.set_field r 3 (Obj.repr blocks);
  Obj.obj r

(* A block array of the mutator's heap holding [f 0] ... [f (n - 1)],
   blocks of that heap. *)
let new_blocks m n (f : int -> Bytes.t) : Bytes.t array =
  if n = 0 then [||]
  else begin
    let a = Heap.block m n 0 in
    for i = 0 to n - 1 do
      Obj.set_field a i (Obj.repr (f i))
    done;
    Obj.obj a
  end

let create pool bsize h =
  let ps = Netsys_mem.pagesize in
  let bsize = if bsize <= ps then ps else (bsize + ps - 1) / ps * ps in
  let r = { st = empty; bsize; header = h } in
  Heap.create_heap pool (Heap.minimum_size r) r

let destroy = Heap.destroy
let state b = Heap.with_value b (fun () -> (Heap.root b).st)
let start b = (Heap.root b).st.start
let length b = (Heap.root b).st.length
let bad_index () = invalid_arg "Netmcore_buffer: bad index"
let bad_index1 () = invalid_arg "Netmcore_buffer: bad index[1]"
let bad_length () = invalid_arg "Netmcore_buffer: bad length"

(* Calls [f blk k n dpos] for each piece of positions [pos] to
   [pos + len - 1] of state [st] (already checked to be valid): bytes [k]
   to [k + n - 1] of block [blk], going to offset [dpos] of the target. *)
let pieces bsize st pos len f =
  let p = ref pos and left = ref len in
  while !left > 0 do
    let rel = !p - st.base in
    let k = rel mod bsize in
    let n = min (bsize - k) !left in
    f st.blocks.(rel / bsize) k n (!p - pos);
    p := !p + n;
    left := !left - n
  done

let check_src st pos len =
  if len < 0 then bad_length ();
  if pos < st.start || pos > st.start + st.length - len then bad_index1 ()

let blit_to_bytes b pos s spos len =
  let bsize = (Heap.root b).bsize in
  state b (fun st ->
      if len < 0 then bad_length ();
      if spos < 0 || spos > Bytes.length s - len then bad_index ();
      check_src st pos len;
      pieces bsize st pos len (fun blk k n d -> Bytes.blit blk k s (spos + d) n))

let blit_to_string = blit_to_bytes

let sub_of bsize st pos len =
  check_src st pos len;
  let s = Bytes.create len in
  pieces bsize st pos len (fun blk k n d -> Bytes.blit blk k s d n);
  Bytes.unsafe_to_string s

let sub b pos len = state b (fun st -> sub_of (Heap.root b).bsize st pos len)
let contents b = state b (fun st -> sub_of (Heap.root b).bsize st st.start st.length)

let blit_to_memory b pos mem mpos len =
  let bsize = (Heap.root b).bsize in
  state b (fun st ->
      if len < 0 then bad_length ();
      if mpos < 0 || mpos > Bigarray.Array1.dim mem - len then bad_index ();
      check_src st pos len;
      pieces bsize st pos len (fun blk k n d -> Netsys_mem.blit_bytes_to_memory blk k mem (mpos + d) n))

let access b pos f =
  let r = Heap.root b in
  let bsize = r.bsize in
  let k = ref 0 and n = ref 0 in
  (* the block itself is pinned while [f] runs *)
  Heap.with_value b
    (fun () ->
      let st = r.st in
      if pos < st.start || pos >= st.start + st.length then bad_index1 ();
      let rel = pos - st.base in
      k := rel mod bsize;
      n := min (bsize - !k) (st.start + st.length - pos);
      st.blocks.(rel / bsize))
    (fun blk -> f blk !k !n)

(* Appends [len] bytes given by [write blk k n d] (copy [n] source bytes
   from source offset [d] into [blk] at [k]). *)
let add b len write =
  Heap.modify b (fun m ->
      let r = Heap.root b in
      let bsize = r.bsize in
      let st = r.st in
      let nb = Array.length st.blocks in
      let end_ = st.start + st.length in
      let missing = end_ + len - (st.base + (nb * bsize)) in
      let blocks =
        if missing <= 0 then st.blocks
        else
          new_blocks m
            (nb + ((missing + bsize - 1) / bsize))
            (fun i -> if i < nb then st.blocks.(i) else Bytes.unsafe_of_string (Heap.add_string m bsize))
      in
      let st' = new_state m ~base:st.base ~start:st.start ~length:(st.length + len) blocks in
      pieces bsize st' end_ len write;
      Commit_point.reached "buffer.add";
      r.st <- st')

let add_substring b s pos len =
  if len < 0 then bad_length ();
  if pos < 0 || pos > String.length s - len then bad_index ();
  add b len (fun blk k n d -> Bytes.blit_string s (pos + d) blk k n)

let add_string b s = add_substring b s 0 (String.length s)
let add_sub_string = add_substring

let add_submemory b mem pos len =
  if len < 0 then bad_length ();
  if pos < 0 || pos > Bigarray.Array1.dim mem - len then bad_index ();
  add b len (fun blk k n d -> Netsys_mem.blit_memory_to_bytes mem (pos + d) blk k n)

let add_sub_memory = add_submemory

let delete_hd b n =
  Heap.modify b (fun m ->
      let r = Heap.root b in
      let st = r.st in
      if n < 0 then bad_length ();
      if n > st.length then bad_index1 ();
      let start = st.start + n in
      (* blocks wholly before the new start go *)
      let drop = min (Array.length st.blocks) ((start - st.base) / r.bsize) in
      let blocks = if drop = 0 then st.blocks else new_blocks m (Array.length st.blocks - drop) (fun i -> st.blocks.(drop + i)) in
      let st' = new_state m ~base:(st.base + (drop * r.bsize)) ~start ~length:(st.length - n) blocks in
      (* the new state is built, unreachable; one store commits *)
      Commit_point.reached "buffer.delete_hd";
      r.st <- st')

(* a fresh state in the heap ([empty] is a value of this process) *)
let clear b = Heap.modify b (fun m -> (Heap.root b).st <- new_state m ~base:0 ~start:0 ~length:0 [||])
let header b = (Heap.root b).header
let descr_of_buffer = Heap.descr_of_heap
let buffer_of_descr = Heap.heap_of_descr
let heap (b : 'h buffer) : Obj.t Heap.heap = Obj.magic b
