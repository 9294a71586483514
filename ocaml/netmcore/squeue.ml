(* Netmcore_queue on our heap: a singly linked list of cells from [head]
   to [tail], with a counter.

   Crash safety: the commit of [push] is the one store that makes the new
   (complete) cell reachable from [head] (the old last cell's [next], or
   [head] of an empty queue); that of a pop is the store into [head];
   that of [clear] the store of [Nil] into [head]. [tail] and [length]
   are derived and set after the commit; [repair] recomputes both by
   walking from [head], and every operation goes through
   [Heap_internal.modify_repairing]. Cells are never unlinked from each
   other, so the chain from a pinned cell stays whole: [iter] pins only
   the first cell. *)

exception Empty = Netmcore_queue.Empty

type 'e chain = Nil | Cell of { conts : 'e; mutable next : 'e chain }

type ('e, 'h) root = {
  mutable head : 'e chain;
  mutable tail : 'e chain;
  mutable length : int;
  header : 'h;
}

type ('e, 'h) squeue = ('e, 'h) root Heap.heap
type ('e, 'h) squeue_descr = ('e, 'h) root Heap.descr

let create pool h =
  let r = { head = Nil; tail = Nil; length = 0; header = h } in
  Heap.create_heap pool (Heap.minimum_size r) r

let repair q _m =
  let r = Heap.root q in
  let rec walk n last = function Nil -> (n, last) | Cell c as cur -> walk (n + 1) cur c.next in
  let n, last = walk 0 Nil r.head in
  r.tail <- last;
  r.length <- n

let modify q f = Heap.modify_repairing q ~repair:(repair q) f

let push x q =
  modify q (fun m ->
      let r = Heap.root q in
      let c = Heap.add m (Cell { conts = x; next = Nil }) in
      (match r.tail with Nil -> r.head <- c | Cell t -> t.next <- c);
      Commit_point.reached "queue.push";
      r.tail <- c;
      r.length <- r.length + 1)

(* Unlinks the first element (lock held). *)
let take r =
  match r.head with
  | Nil -> raise Empty
  | Cell c ->
      r.head <- c.next;
      Commit_point.reached "queue.pop";
      if c.next == Nil then r.tail <- Nil;
      r.length <- r.length - 1;
      c.conts

let first r = match r.head with Nil -> raise Empty | Cell c -> c.conts
let pop_p q f = Heap.with_value q (fun () -> modify q (fun _ -> take (Heap.root q))) f
let pop_c q = modify q (fun _ -> Heap.copy (take (Heap.root q)))
let top_p q f = Heap.with_value q (fun () -> modify q (fun _ -> first (Heap.root q))) f
let top_c q = modify q (fun _ -> Heap.copy (first (Heap.root q)))

let clear q =
  modify q (fun _ ->
      let r = Heap.root q in
      r.head <- Nil;
      Commit_point.reached "queue.clear";
      r.tail <- Nil;
      r.length <- 0)

let length q = modify q (fun _ -> (Heap.root q).length)
let is_empty q = length q = 0

(* The elements present when [iter] starts, without the lock: the first
   cell is pinned (and with it the rest of the snapshot) while [f] runs. *)
let iter f q =
  let n = ref 0 in
  Heap.with_value q
    (fun () ->
      modify q (fun _ ->
          let r = Heap.root q in
          n := r.length;
          r.head))
    (fun first ->
      let rec go k = function
        | Cell c when k > 0 ->
            f c.conts;
            go (k - 1) c.next
        | _ -> ()
      in
      go !n first)

let fold f acc q =
  let a = ref acc in
  iter (fun x -> a := f !a x) q;
  !a

let header q = (Heap.root q).header
let heap (q : ('e, 'h) squeue) : Obj.t Heap.heap = Obj.magic q
let descr_of_squeue = Heap.descr_of_heap
let squeue_of_descr = Heap.heap_of_descr
