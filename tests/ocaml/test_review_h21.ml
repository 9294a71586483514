(* Regression tests of the h21 review of the heap and structure changes
   (issues 11 and 12). Each scenario runs in a forked child on a fresh
   pool, which the parent unlinks whatever happens (a scenario that breaks
   the heap may segfault); a child still running after 60 s is killed. *)
open Shmpool_netmcore
module H = Netmcore_heap

let with_pool size f =
  let pool = Netmcore_mempool.create_mempool size in
  Fun.protect ~finally:(fun () -> try Netmcore_mempool.unlink_mempool pool with _ -> ()) (fun () -> f pool)

(* Inside [modify h] (mutator [m]): more than MIN_GC_WORDS allocated, then
   the free lists used up (all of it rooted: additions of this modify), so
   that the next allocation runs the heap's GC. *)
let gc_due_and_full h m =
  ignore (H.add m (String.make 80_000 'b'));
  let rec fill () =
    let free = (H.stats h).H.free_words in
    if free >= 2 then begin
      ignore (H.add m (String.make (if free > 4096 then 4000 else 7) 'f'));
      fill ()
    end
  in
  fill ()

(* A block of every small size: one of them has the size of whatever the
   GC freed, so a freed value's words are reused. *)
let every_small_size m =
  for w = 1 to 62 do
    ignore (H.add m (String.make ((w * 8) - 1) 'z'))
  done

(* [Netmcore_queue.pop_p] inside a [modify] of the queue's heap (nested
   locks are allowed) when that modify left the free lists empty and a GC
   due: [take] unlinks the element, then [with_value] pins it, and the
   pin's own allocation collects. The element, held by nothing but the
   caller, was freed by that GC (before the fix: the child segfaulted once
   the next allocations reused its words). *)
let pop_p_nested pool =
  let q = Netmcore_queue.create pool () in
  let h = Netmcore_queue.heap q in
  let expected = String.init 80 (fun i -> Char.chr (65 + (i mod 26))) in
  Netmcore_queue.push expected q;
  let first, later =
    H.modify h (fun m ->
        gc_due_and_full h m;
        Netmcore_queue.pop_p q (fun s ->
            let first = String.equal s expected in
            every_small_size m;
            (first, String.equal s expected)))
  in
  H.destroy h;
  if not (first && later) then Printf.eprintf "popped element changed: before %b, after %b\n%!" first later;
  first && later

let t_pop_p_nested () =
  with_pool (16 * 1024 * 1024) (fun pool ->
      Testutil.check_child "pop_p nested in a modify" (Testutil.fork_run (fun () -> pop_p_nested pool)))

(* [add_some m x] where [x] is a heap value the mutator just detached (a
   value moved from one place of the heap to another, wrapped in [Some]),
   the free lists used up and a GC due: the allocation of the [Some] block
   collects, and [x] must survive it. *)
let add_some_detached pool =
  let expected = String.init 80 (fun i -> Char.chr (97 + (i mod 26))) in
  let h = H.create_heap pool 4096 (ref (None : string option), ref (Some expected)) in
  let ok =
    H.modify h (fun m ->
        gc_due_and_full h m;
        let dst, src = H.root h in
        let v = Option.get !src in
        src := None;
        dst := H.add_some m v;
        every_small_size m;
        !dst = Some expected)
  in
  H.destroy h;
  if not ok then prerr_endline "the moved value changed";
  ok

let t_add_some_detached () =
  with_pool (16 * 1024 * 1024) (fun pool ->
      Testutil.check_child "add_some of a detached value" (Testutil.fork_run (fun () -> add_some_detached pool)))

let () =
  Alcotest.run "review h21"
    [ ( "heap",
        [ Alcotest.test_case "pop_p nested in a modify keeps its element" `Quick t_pop_p_nested;
          Alcotest.test_case "add_some keeps a value detached in the same modify" `Quick t_add_some_detached ] ) ]
