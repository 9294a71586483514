(* Regression tests of the independent review of the heap and structures
   (issues 11 and 12, branch h20-review). Each scenario runs in a forked
   child on a fresh pool, which the parent unlinks whatever happens; a
   child that hangs is killed by the watchdog and the test fails (a hang
   detector, not a time budget). *)
open Shmpool_netmcore
module H = Netmcore_heap

let with_pool size f =
  let pool = Netmcore_mempool.create_mempool size in
  Fun.protect ~finally:(fun () -> try Netmcore_mempool.unlink_mempool pool with _ -> ()) (fun () -> f pool)

(* 1. The first use of a heap in a process through [root] (deref_ro,
   get_ro, find_ro ...) opens the heap there, which may grow the table of
   cached roots; [root] indexed the table it had read before the open: a
   read past its end, garbage as the root, a segfault. Every worker that
   reads structures the master created before the fork does this. The
   table grows at handle numbers that depend on what the process opened
   before, so master/worker pairs with 1 to 20 structures are tried. *)
let t_root_first_use () =
  let failures = ref [] in
  for n = 1 to 20 do
    with_pool (16 * 1024 * 1024) (fun pool ->
        let r =
          Testutil.fork_run (fun () ->
              (* the "master": n shared refs, then a "worker" forked from it *)
              let refs = List.init n (fun i -> Netmcore_ref.sref pool (string_of_int i)) in
              let w =
                Testutil.fork_run (fun () ->
                    List.for_all (fun x -> x) (List.mapi (fun i r -> Netmcore_ref.deref_ro r = string_of_int i) refs))
              in
              (match w with Error e -> Printf.eprintf "n=%d: worker %s\n%!" n e | Ok () -> ());
              List.iter (fun r -> H.destroy (Netmcore_ref.heap r)) refs;
              w = Ok ())
        in
        match r with Ok () -> () | Error e -> failures := (n, e) :: !failures)
  done;
  if !failures <> [] then
    Alcotest.failf "the worker failed with %s structures"
      (String.concat ", " (List.rev_map (fun (n, _) -> string_of_int n) !failures))

(* 2. A heap record (here an sref) stored inside another heap's value is
   shared memory: every process that used it wrote its own cached handle
   number and pid into it, in two stores. Two workers using it at once
   tore the pair: a worker then took the other's handle number for its own
   and used whatever heap that number is in this process (wrong roots, a
   "heap destroyed" failure, or writes into the wrong heap). OCamlnet
   forbids heaps inside heaps, but nothing refuses them and the
   structures are heaps: the cache is one word now. The workers number
   their handles differently (one opens five heaps first), and rounds are
   repeated because the tear needs the two to interleave (it showed in
   between 1 and 30 rounds of 100 before the fix). *)
let t_heap_record_in_heap () =
  let bad_rounds = ref 0 in
  for _round = 1 to 100 do
    with_pool (16 * 1024 * 1024) (fun pool ->
        let r =
          Testutil.fork_run (fun () ->
              let inner = Netmcore_ref.sref pool 0 in
              let outer = Netmcore_ref.sref pool [ inner ] in
              let other = Netmcore_ref.sref pool 1 in
              let worker extra () =
                let xs = List.init extra (fun _ -> Netmcore_ref.sref pool (-1)) in
                let ok = ref true in
                for i = 1 to 200_000 do
                  let r = List.hd (Netmcore_ref.deref_ro outer) in
                  (* another heap in between, so the cached last root misses *)
                  if Netmcore_ref.deref_ro other <> 1 then ok := false;
                  if Netmcore_ref.deref_ro r < 0 then ok := false;
                  if i mod 50 = 0 then Netmcore_ref.assign r i
                done;
                List.for_all (fun x -> Netmcore_ref.deref_ro x = -1) xs && !ok
              in
              let ws = List.map (fun extra -> Unix.fork () |> function
                | 0 -> Unix._exit (if (try worker extra () with e -> prerr_endline (Printexc.to_string e); false) then 0 else 1)
                | pid -> pid) [ 0; 5 ] in
              List.for_all (fun pid -> Testutil.watch_child pid = Ok ()) ws)
        in
        if r <> Ok () then incr bad_rounds)
  done;
  if !bad_rounds > 0 then Alcotest.failf "%d rounds of 100 went wrong" !bad_rounds

(* 3. A private copy of an error-checking or recursive mutex
   ([Netmcore_heap.copy], [deref_c], [get_c], [find_c] of a value holding
   one) still carried the mutex's magic, so [lock] locked a pthread
   robust mutex inside OCaml's own heap, which registers its address in
   the thread's robust list. Once the GC moved the copy, the next robust
   lock of the thread (any heap [modify]) wrote a list pointer at the old
   address: into whatever private value lives there now. Locking such a
   copy must fail (it is no shared mutex) and corrupt nothing. *)
let private_mutex_copy kind pool =
  let h = H.create_heap pool 4096 (ref (Netmcore_mutex.dummy ())) in
  H.modify h (fun m -> H.root h := Netmcore_mutex.create m kind);
  (* the copy near the top of the minor heap, then moved by a minor GC;
     young arrays of zeros over its old place *)
  Gc.minor ();
  let c = H.copy !(H.root h) in
  let refused = match Netmcore_mutex.lock c with () -> false | exception Failure _ -> true in
  if not refused then prerr_endline "a private copy of the mutex was locked";
  Gc.minor ();
  let arrs = Array.init 64 (fun _ -> Array.make 200 0) in
  H.modify h ignore;
  let bad = Array.fold_left (fun n a -> Array.fold_left (fun n x -> if x <> 0 then n + 1 else n) n a) 0 arrs in
  if bad > 0 then Printf.eprintf "%d fields of private arrays overwritten\n%!" bad;
  (try Netmcore_mutex.unlock c with Failure _ -> ());
  (* the shared mutex itself still works *)
  Netmcore_mutex.lock !(H.root h);
  Netmcore_mutex.unlock !(H.root h);
  H.destroy h;
  refused && bad = 0

let t_private_mutex_copy () =
  List.iter
    (fun (name, kind) ->
      with_pool (16 * 1024 * 1024) (fun pool ->
          Testutil.check_child name (Testutil.fork_run (fun () -> private_mutex_copy kind pool))))
    [ ("Errorcheck", `Errorcheck); ("Recursive", `Recursive) ]

(* 4. with_value_n pins its values one by one inside the lock; when the
   pool runs out in the middle (each pin is a heap block), the pins
   already taken must go too: nothing else would ever release them (their
   process is alive), and the values they hold would never be collected. *)
let pins_released_on_oom pool =
  let n = 100_000 in
  let h = H.create_heap pool (2 * 1024 * 1024) (Array.init n (fun i -> ref i)) in
  let before = (H.stats h).H.pins in
  let raised =
    try
      H.with_value_n h (fun () -> Array.to_list (H.root h)) (fun _ -> ());
      false
    with Netmcore_mempool.Out_of_pool_memory -> true
  in
  let after = (H.stats h).H.pins in
  if not raised then prerr_endline "pinning 100,000 values did not run out of pool memory";
  if after <> before then Printf.eprintf "%d pins left after the failed with_value_n\n%!" (after - before);
  raised && after = before

let t_pins_released_on_oom () =
  with_pool (6 * 1024 * 1024) (fun pool ->
      Testutil.check_child "pins" (Testutil.fork_run (fun () -> pins_released_on_oom pool)))

let () =
  Alcotest.run "heap review 2"
    [
      ( "memory safety",
        [ Alcotest.test_case "first use of a heap through root in a worker" `Quick t_root_first_use;
          Alcotest.test_case "a heap record inside a heap, used by two workers" `Quick t_heap_record_in_heap;
          Alcotest.test_case "a private copy of a mutex is no mutex" `Quick t_private_mutex_copy;
          Alcotest.test_case "pins taken before the pool ran out are released" `Quick t_pins_released_on_oom;
        ] );
    ]
