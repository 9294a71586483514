(* Netmcore_hashtbl on our heap: separate chaining in a bucket array, the
   newest binding of a key first in its chain. The bucket count starts at
   391 and becomes 2n+1 when the table holds more than twice as many
   bindings as buckets, and keys go to bucket [Hashtbl.hash key mod n]:
   the same as the original, so [iter] visits bindings in the same order.

   Crash safety: each operation changes what the root reaches by one
   store (the commit), and only the binding counter [size] is updated
   after it; [repair] recounts it, and every writer (and [length]) goes
   through [Heap_internal.modify_repairing], so the first one after a
   holder's death fixes the count.
   - add: the new cell is complete (key, value, next) before the store into
     its bucket that makes it reachable.
   - replace: the new value is copied, then stored into the cell.
   - remove: one store unlinks the cell.
   - clear: one store of a fresh bucket array.
   - resize: builds a complete new bucket array of new cells (sharing the
     keys and values), then stores it into the root; the old cells are never
     relinked, so a death in the middle leaves the old table intact (and
     readers without the lock see either table whole). *)

type ('a, 'b) chain = Nil | Cell of { key : 'a; mutable value : 'b; mutable next : ('a, 'b) chain }

type ('a, 'b, 'h) root = {
  mutable size : int;
  mutable buckets : ('a, 'b) chain array;
  header : 'h;
}

type ('a, 'b, 'h) t = ('a, 'b, 'h) root Heap.heap
type ('a, 'b, 'h) t_descr = ('a, 'b, 'h) root Heap.descr

let initial_buckets = 391

let create pool h =
  let r = { size = 0; buckets = Array.make initial_buckets Nil; header = h } in
  Heap.create_heap pool (Heap.minimum_size r) r

let index key n = Hashtbl.hash key mod n

let rec count acc = function Nil -> acc | Cell c -> count (acc + 1) c.next

(* Idempotent: the number of cells the buckets reach. *)
let recount t _m =
  let r = Heap.root t in
  r.size <- Array.fold_left count 0 r.buckets

let modify t f = Heap.modify_repairing t ~repair:(recount t) f

let resize m r =
  let old = r.buckets in
  let osize = Array.length old in
  let nsize = min ((2 * osize) + 1) Sys.max_array_length in
  if nsize <> osize then begin
    let nb = Heap.add_uniform_array m nsize Nil in
    (* last cell of each new chain, private (the cells are kept alive by
       the running modify) *)
    let last = Array.make nsize Nil in
    (* Old buckets from the last to the first, each chain in order: within
       a new chain, the bindings of a key keep their order. *)
    for i = osize - 1 downto 0 do
      let rec move = function
        | Nil -> ()
        | Cell c ->
            let j = index c.key nsize in
            (* a cell of key and value already in the heap, without
               copy-in: a fresh block (tag 0 = Cell, next = () = Nil) *)
            let b = Heap.block m 3 0 in
            Obj.set_field b 0 (Obj.repr c.key);
            Obj.set_field b 1 (Obj.repr c.value);
            let nc : ('a, 'b) chain = Obj.obj b in
            (match last.(j) with Nil -> nb.(j) <- nc | Cell l -> l.next <- nc);
            last.(j) <- nc;
            move c.next
      in
      move old.(i);
      if i = osize / 2 then Commit_point.reached "hashtbl.resize"
    done;
    r.buckets <- nb
  end

let add_cell m r key value =
  let b = r.buckets in
  let i = index key (Array.length b) in
  let c = Heap.add m (Cell { key; value; next = Nil }) in
  (match c with Cell cell -> cell.next <- b.(i) | Nil -> assert false);
  b.(i) <- c;
  Commit_point.reached "hashtbl.add";
  r.size <- r.size + 1;
  if r.size > 2 * Array.length b then resize m r

let add t key value = modify t (fun m -> add_cell m (Heap.root t) key value)

let clear t =
  modify t (fun m ->
      let r = Heap.root t in
      r.buckets <- Heap.add_uniform_array m (Array.length r.buckets) Nil;
      Commit_point.reached "hashtbl.clear";
      r.size <- 0)

let remove t key =
  modify t (fun _ ->
      let r = Heap.root t in
      let b = r.buckets in
      let i = index key (Array.length b) in
      let rec go prev = function
        | Nil -> ()
        | Cell c as cur ->
            if compare c.key key = 0 then begin
              (match prev with Nil -> b.(i) <- c.next | Cell p -> p.next <- c.next);
              Commit_point.reached "hashtbl.remove";
              r.size <- r.size - 1
            end
            else go cur c.next
      in
      go Nil b.(i))

let replace t key value =
  modify t (fun m ->
      let r = Heap.root t in
      let b = r.buckets in
      let rec go = function
        | Nil -> add_cell m r key value
        | Cell c ->
            if compare c.key key = 0 then begin
              (* the new value is built first, unreachable; one store commits *)
              let v = Heap.add m value in
              Commit_point.reached "hashtbl.replace";
              c.value <- v
            end
            else go c.next
      in
      go b.(index key (Array.length b)))

let rec find_in key = function
  | Nil -> raise Not_found
  | Cell c -> if compare key c.key = 0 then c.value else find_in key c.next

let lookup t key =
  let b = (Heap.root t).buckets in
  find_in key (Array.unsafe_get b (index key (Array.length b)))

let find_ro = lookup
let find_p t key f = Heap.with_value t (fun () -> lookup t key) f
let find_c t key = Heap.with_value t (fun () -> Heap.copy (lookup t key)) Fun.id

let rec all_in key = function
  | Nil -> []
  | Cell c -> if compare key c.key = 0 then c.value :: all_in key c.next else all_in key c.next

let lookup_all t key =
  let b = (Heap.root t).buckets in
  all_in key (Array.unsafe_get b (index key (Array.length b)))

let find_all_ro = lookup_all
let find_all_p t key f = Heap.with_value_n t (fun () -> lookup_all t key) f
let find_all_c t key = Heap.with_value t (fun () -> Heap.copy (lookup_all t key)) Fun.id
let mem_ro t key = match lookup t key with _ -> true | exception Not_found -> false
let mem t key = modify t (fun _ -> mem_ro t key)

(* Under the lock, as the original: [f] must not modify the table (with
   ours it can, the lock being re-entrant, but the visit is then
   unspecified, as with Stdlib's Hashtbl). *)
let iter f t =
  modify t (fun _ ->
      let b = (Heap.root t).buckets in
      let rec visit = function
        | Nil -> ()
        | Cell c ->
            f c.key c.value;
            visit c.next
      in
      for i = 0 to Array.length b - 1 do
        visit b.(i)
      done)

let length t = modify t (fun _ -> (Heap.root t).size)
let header t = (Heap.root t).header
let heap (t : ('a, 'b, 'h) t) : Obj.t Heap.heap = Obj.magic t
let descr_of_hashtbl = Heap.descr_of_heap
let hashtbl_of_descr = Heap.heap_of_descr
