(* Regression tests of the shared heap review (issue 11, branch h14-review):
   each scenario runs in a forked child on a fresh pool, which the parent
   unlinks whatever happens; a child that hangs is killed by the watchdog
   and the test fails (a hang detector, not a time budget). *)
open Shmpool_netmcore
module H = Netmcore_heap

(* Waits for child [pid] (Testutil.watch_child: killed after 60 s, a hang
   detector); fails test [name] unless it exited 0. *)
let watch name pid = Testutil.check_child name (Testutil.watch_child pid)

let with_pool size f =
  let pool = Netmcore_mempool.create_mempool size in
  Fun.protect ~finally:(fun () -> try Netmcore_mempool.unlink_mempool pool with _ -> ()) (fun () -> f pool)

let child = Testutil.fork_bool

(* [f pool] in a child on a fresh pool: true = pass. *)
let in_child ?(size = 64 * 1024 * 1024) name f =
  with_pool size (fun pool -> watch name (child (fun () -> f pool)))

(* Finding 1: inside one modify, a value unlinked from the root and then
   copied (whole with [add], by reference with [add_immutable]): the copy's
   allocation runs the heap's GC (heap full, enough allocated since the last
   one), which must not free the source. The copy is checked block by
   block; a freed source shows as a free block (Abstract_tag) or a crash. *)
let gc_during_copy ~share pool =
  let h = H.create_heap pool (256 * 1024) [| []; [] |] in
  let arr = H.root h in
  let n = 1000 in
  let l = List.init n (fun i -> (i, string_of_int i)) in
  (* the list, a live value just below it (blocks are carved from the end
     of free space), then garbage filling the rest of the heap *)
  H.modify h (fun m -> arr.(0) <- H.add m l);
  H.modify h (fun m -> arr.(1) <- H.add m [ (0, "x") ]);
  let fw = (H.stats h).H.free_words in
  H.modify h (fun m -> ignore (H.add_string m ((fw - 8) * 8)));
  let gcs = (H.stats h).H.gcs in
  let c =
    H.modify h (fun m ->
        let old = arr.(0) in
        arr.(0) <- [];
        let t = (1, 2, 3, 4, 5) in
        let c = snd (if share then H.add_immutable m (t, old) else H.add m (t, old)) in
        arr.(0) <- c;
        c)
  in
  let gc_ran = (H.stats h).H.gcs > gcs in
  if not gc_ran then prerr_endline "the scenario did not make the GC run inside the add";
  let ok =
    gc_ran
    && Obj.tag (Obj.repr c) = 0
    && List.length c = n
    && List.for_all2 (fun (a, s) (b, t) -> a = b && s = t) c l
  in
  (* the heap is sound after a GC too *)
  H.gc h;
  ok && List.for_all2 (fun (a, s) (b, t) -> a = b && s = t) (H.root h).(0) l

let t_gc_during_add () = in_child "add" (gc_during_copy ~share:false)
let t_gc_during_add_immutable () = in_child "add_immutable" (gc_during_copy ~share:true)

(* Finding 2: debug_info and stats from a second thread while the first is
   inside modify and needs the runtime lock to finish. *)
let info_during_modify which pool =
  let h = H.create_heap pool 4096 (ref 0) in
  let m = Mutex.create () and c = Condition.create () and inside = ref false in
  let a =
    Thread.create
      (fun () ->
        H.modify h (fun _ ->
            Mutex.lock m;
            inside := true;
            Condition.signal c;
            Mutex.unlock m;
            (* a blocking call hands the runtime lock to the main thread,
               which then asks for the heap lock *)
            Unix.sleepf 0.2;
            H.root h := 1))
      ()
  in
  Mutex.lock m;
  while not !inside do
    Condition.wait c m
  done;
  Mutex.unlock m;
  let ok =
    match which with
    | `Debug_info -> String.length (H.debug_info h) > 0
    | `Stats -> (H.stats h).H.chunks >= 1
  in
  Thread.join a;
  let stored = !(H.root h) = 1 in
  H.destroy h;
  ok && stored

let t_debug_info_during_modify () = in_child ~size:(4 * 1024 * 1024) "debug_info" (info_during_modify `Debug_info)
let t_stats_during_modify () = in_child ~size:(4 * 1024 * 1024) "stats" (info_during_modify `Stats)

(* Finding 3: with_value whose find returns a block outside the heap (a
   fresh tuple, moved by the minor GC during process) left its pin. *)
let t_with_value_pins () =
  in_child ~size:(16 * 1024 * 1024) "pins" (fun pool ->
      let h = H.create_heap pool 4096 (ref [ 1 ]) in
      let sum = ref 0 in
      for i = 1 to 1000 do
        H.with_value h
          (fun () -> (i, !(H.root h)))
          (fun (j, l) ->
            Gc.minor ();
            sum := !sum + j + List.length l)
      done;
      (* and in-heap values are still pinned while process runs *)
      let pinned_inside = H.with_value h (fun () -> !(H.root h)) (fun _ -> (H.stats h).H.pins) in
      let pins = (H.stats h).H.pins in
      if pins <> 0 then Printf.eprintf "%d pins left (0 expected)\n%!" pins;
      H.destroy h;
      pins = 0 && pinned_inside = 1 && !sum = (1000 * 1001 / 2) + 1000)

(* Finding 4: a process that opened heap H1 keeps its handle cached by
   (pool, descriptor); another process destroys H1 and creates H2 on the
   same pool block. heap_of_descr of H2's descriptor must open H2. *)
let t_reused_descr () =
  with_pool (4 * 1024 * 1024) (fun pool ->
      let h1 = H.create_heap pool 4096 (ref "one") in
      let d1 = H.descr_of_heap h1 in
      let to_child_r, to_child_w = Unix.pipe () and to_parent_r, to_parent_w = Unix.pipe () in
      let b = Bytes.create 16 in
      let pid =
        child (fun () ->
            Unix.close to_child_w;
            Unix.close to_parent_r;
            let c1 : string ref H.heap = H.heap_of_descr pool d1 in
            let one = !(H.root c1) = "one" in
            ignore (Unix.write_substring to_parent_w "o" 0 1);
            let n = Unix.read to_child_r b 0 16 in
            let d2 : string ref H.descr = Obj.magic (int_of_string (Bytes.sub_string b 0 n)) in
            let c2 : string ref H.heap = H.heap_of_descr pool d2 in
            let two = !(H.root c2) = "two" in
            (* the old record answers "destroyed", not H2's root *)
            let old_dead = match !(H.root c1) with _ -> false | exception Failure _ -> true in
            if not old_dead then prerr_endline "the record of H1 reads H2";
            one && two && old_dead)
      in
      Unix.close to_child_r;
      Unix.close to_parent_w;
      let go () =
        ignore (Unix.read to_parent_r b 0 1);
        H.destroy h1;
        let h2 = H.create_heap pool 4096 (ref "two") in
        let d2 = H.descr_of_heap h2 in
        let s = string_of_int (Obj.magic d2 : int) in
        ignore (Unix.write_substring to_child_w s 0 (String.length s));
        Fun.protect ~finally:(fun () -> H.destroy h2) (fun () -> watch "reused descr" pid);
        if (Obj.magic d1 : int) <> (Obj.magic d2 : int) then
          print_endline "note: the pool gave H2 another block (the scenario did not reuse the descriptor)"
      in
      Fun.protect ~finally:(fun () -> Unix.close to_child_w; Unix.close to_parent_r) go)

(* Finding 6: with Debug.enable, modify's escape check (which allocates
   and logs) ran before the unlock: a logger that waits for another thread
   using the heap deadlocked. *)
let t_escape_check_after_unlock () =
  in_child ~size:(4 * 1024 * 1024) "escape check" (fun pool ->
      let h = H.create_heap pool 4096 (ref [ "shared" ]) in
      let logged = ref 0 in
      Netlog.Debug.current_dlogger :=
        (fun m _ ->
          if m = "Netmcore_heap" then begin
            incr logged;
            Thread.join (Thread.create (fun () -> ignore (H.stats h)) ())
          end);
      H.Debug.enable := true;
      H.modify h (fun _ -> H.root h := [ String.make 3 'p' ]);
      H.Debug.enable := false;
      H.modify h (fun m -> H.root h := H.add m [ "fine" ]);
      H.destroy h;
      !logged > 0)

let () =
  Alcotest.run "heap_review"
    [
      ( "review",
        [
          Alcotest.test_case "GC during add keeps the source" `Quick t_gc_during_add;
          Alcotest.test_case "GC during add_immutable keeps the shared parts" `Quick
            t_gc_during_add_immutable;
          Alcotest.test_case "debug_info from a thread during modify" `Quick t_debug_info_during_modify;
          Alcotest.test_case "stats from a thread during modify" `Quick t_stats_during_modify;
          Alcotest.test_case "with_value of a private block leaves no pin" `Quick t_with_value_pins;
          Alcotest.test_case "heap_of_descr at a reused descriptor" `Quick t_reused_descr;
          Alcotest.test_case "Debug escape check runs unlocked" `Quick t_escape_check_after_unlock;
        ] );
    ]
