(* Staged death, driven from OCaml: a child stopped at each write step of
   an alloc and of a free (holding the pool lock), and of its large cache's
   locked steps (a refill: an alloc of more than 64 pages with a spare run
   after it, in a pool large enough to have one; the scrub of a merged
   run's ghost word when it is freed; a give-back of runs past the cache's
   bound; the take-back of every cache when memory runs out), then
   SIGKILLed. The
   parent must find the pool repaired (one recovery, check clean) and
   reclaim_dead must return exactly what the child held. *)

module P = Shmpool_crashtest.Shmpool
module C = Shmpool_crashtest.Crash_point

let ps = P.page_size

(* wait for [pid] to stop (or end), polling, at most [secs] seconds *)
let wait_stopped ?(secs = 10.0) pid =
  let t0 = Unix.gettimeofday () in
  let rec go () =
    match Unix.waitpid [ Unix.WNOHANG; Unix.WUNTRACED ] pid with
    | 0, _ ->
        if Unix.gettimeofday () -. t0 > secs then `Timeout
        else (Unix.sleepf 0.002; go ())
    | _, Unix.WSTOPPED _ -> `Stopped
    | _, st -> `Ended st
  in
  go ()

let kill_and_reap pid =
  (try Unix.kill pid Sys.sigkill with Unix.Unix_error _ -> ());
  try ignore (Unix.waitpid [] pid) with Unix.Unix_error _ -> ()

type op = Alloc | Free | Refill | Scrub | Give_back | Take_back

let points_of = function
  | Alloc -> C.[ Locked; Alloc_unlinked; Alloc_committed; Alloc_remainder_filed; Before_unlock ]
  | Free -> C.[ Locked; Free_committed; Free_neighbours_unlinked; Free_filed; Before_unlock ]
  | Refill -> C.[ Alloc_spare_cached ]
  | Scrub -> C.[ Large_scrubbing ]
  | Give_back -> C.[ Large_give_back ]
  | Take_back -> C.[ Take_back_freed ]

(* A process caches at most a 16th of the pool, and a spare run must be
   longer than 64 pages: 8192 pages give spares of up to 128, whole
   blocks of the refill's length (100 for 100, 128 for 128). *)
let pool_pages = function
  | Refill | Scrub | Give_back | Take_back -> 8192
  | Alloc | Free -> 1024

(* pages the child holds when killed at [p] during [op] *)
let held op p =
  let warm = 1 and big = 100 in
  match (op, p) with
  | Alloc, C.(Alloc_committed | Alloc_remainder_filed | Before_unlock) -> warm + big
  | Alloc, _ -> warm
  | Free, C.(Locked) -> warm + big
  | Free, _ -> warm
  | Refill, _ -> warm + big (* the spare is cached: free already *)
  | Scrub, _ -> warm + big + 240 (* the run being freed is cached: free already *)
  | Give_back, _ -> warm + big
  | Take_back, _ -> warm

let trial op p =
  let pool = P.create (pool_pages op * ps) in
  Fun.protect ~finally:(fun () -> P.close pool) @@ fun () ->
  (* a neighbour on each side, so free coalesces and alloc splits *)
  let left = P.alloc pool (3 * ps) in
  let pid =
    Testutil.fork (fun () ->
        let _warm = P.alloc pool ps in
        match op with
        | Alloc | Free | Refill ->
            let big = if op = Free then Some (P.alloc pool (100 * ps)) else None in
            C.arm p;
            (match big with
             | Some m -> P.free pool m
             | None -> ignore (P.alloc pool (100 * ps)));
            C.disarm ()
        | Scrub ->
            (* a with a spare run after it; b split from the spare and
               freed; c, which no cached run fits, first merges b with the
               spare's tail (merging waits for an alloc that needs it),
               whose head becomes a ghost word that the flush scrubs *)
            let _a = P.alloc pool (100 * ps) in
            let b = P.alloc pool (70 * ps) in
            P.free pool b;
            let _c = P.alloc pool (240 * ps) in
            C.arm p;
            P.flush_cache pool;
            C.disarm ()
        | Give_back ->
            (* blocks of 128 pages after a (a 16th of the pool is 512,
               spares are whole blocks of up to 128 pages): a's spare is
               100, the first and third refills with a spare of 128 each,
               the second and fourth those spares, 100 pages cached;
               freeing the four caches 128 more each, and the last free
               (612) gives the runs back, with only a still live *)
            let _a = P.alloc pool (100 * ps) in
            let bs = List.init 4 (fun _ -> P.alloc pool (128 * ps)) in
            C.arm p;
            List.iter (P.free pool) bs;
            C.disarm ()
        | Take_back ->
            (* a and its spare cached, then an alloc no free run holds *)
            let a = P.alloc pool (100 * ps) in
            P.free pool a;
            C.arm p;
            (try ignore (P.alloc pool ((8192 - 100) * ps)) with P.Out_of_pool_memory -> ());
            C.disarm ())
  in
  (match wait_stopped pid with
   | `Stopped -> ()
   | `Timeout -> kill_and_reap pid; Alcotest.failf "%s: child never stopped" (C.name p)
   | `Ended _ -> Alcotest.failf "%s: child ended instead of stopping" (C.name p));
  kill_and_reap pid;
  Testutil.children := List.filter (( <> ) pid) !Testutil.children;
  let s = P.stats pool in
  Alcotest.(check int) (C.name p ^ ": one recovery") 1 s.recoveries;
  Alcotest.(check (list string)) (C.name p ^ ": check clean") [] (P.check pool);
  let r = P.reclaim_dead pool in
  Alcotest.(check int) (C.name p ^ ": reclaimed the child's pages") (held op p) r.pages_freed;
  P.free pool left;
  let s = P.stats pool in
  Alcotest.(check int) (C.name p ^ ": all free") s.payload s.free;
  Alcotest.(check int) (C.name p ^ ": one run") s.payload s.largest_free;
  Alcotest.(check (list string)) (C.name p ^ ": check clean at the end") [] (P.check pool)

(* One list of crash points, the Rust one: a point added there and not
   here (or the other way round, or renamed, or reordered) fails this. *)
let test_same_points_as_rust () =
  Alcotest.(check (list string))
    "the OCaml crash points are rust/src/crashpoint.rs's, in order"
    (List.map fst C.in_rust) (List.map C.name C.all)

let test_every_point_visited () =
  let visited =
    List.concat_map points_of [ Alloc; Free; Refill; Scrub; Give_back; Take_back ]
  in
  List.iter
    (fun p -> Alcotest.(check bool) (C.name p ^ " is visited by a trial") true (List.mem p visited))
    C.all

(* An internal panic in any stub, hot or cold, becomes the documented
   Failure, twice in a row (ocaml-rs's panic hook aborted the process on the
   second), and the process goes on working. *)
let test_induced_panics () =
  Testutil.with_name "shmpool" @@ fun name ->
  let pool = P.create ~name (16 * ps) in
  let m = P.alloc pool ps in
  let internal fn f =
    for _ = 1 to 2 do
      C.arm_panic ();
      match f () with
      | _ -> Alcotest.failf "%s: no exception after an internal panic" fn
      | exception Failure msg ->
          Alcotest.(check string) fn (fn ^ ": internal error: induced by a test") msg
    done
  in
  internal "Shmpool.alloc" (fun () -> ignore (P.alloc pool ps));
  internal "Shmpool.free" (fun () -> P.free pool m);
  internal "Shmpool.size" (fun () -> ignore (P.size pool m));
  internal "Shmpool.stats" (fun () -> ignore (P.stats pool));
  internal "Shmpool.check" (fun () -> ignore (P.check pool));
  internal "Shmpool.debug_info" (fun () -> ignore (P.debug_info pool));
  internal "Shmpool.owners" (fun () -> ignore (P.owners pool));
  internal "Shmpool.reclaim_dead" (fun () -> ignore (P.reclaim_dead pool));
  internal "Shmpool.attach" (fun () -> ignore (P.attach name));
  internal "Shmpool.create" (fun () -> ignore (P.create ps));
  internal "Shmpool.prefault_shm" (fun () -> P.prefault_shm name);
  internal "Shmpool.flush_cache" (fun () -> P.flush_cache pool);
  (* a hot-path panic after cold-path ones (the hook made this one abort) *)
  internal "Shmpool.free" (fun () -> P.free pool m);
  (* nothing changed, and everything still works *)
  Alcotest.(check int) "live" 1 (P.stats pool).live_blocks;
  Alcotest.(check int) "size" ps (P.size pool m);
  let q = P.attach name in
  let m2 = P.alloc q (2 * ps) in
  P.free q m2;
  P.close q;
  P.free pool m;
  Alcotest.(check (list string)) "check clean" [] (P.check pool);
  P.unlink pool;
  P.close pool

let () =
  let cases op =
    List.map
      (fun p ->
        Alcotest.test_case
          (Printf.sprintf "%s killed at %s"
             (match op with
              | Alloc -> "alloc"
              | Free -> "free"
              | Refill -> "large refill"
              | Scrub -> "large scrub"
              | Give_back -> "large give-back"
              | Take_back -> "take-back")
             (C.name p))
          `Quick (fun () -> trial op p))
      (points_of op)
  in
  Alcotest.run "shmpool staged death (OCaml)"
    [
      ( "points",
        [
          Alcotest.test_case "same points as the Rust core" `Quick test_same_points_as_rust;
          Alcotest.test_case "every point visited" `Quick test_every_point_visited;
        ] );
      ("alloc", cases Alloc);
      ("free", cases Free);
      ("refill", cases Refill);
      ("scrub", cases Scrub);
      ("give-back", cases Give_back);
      ("take-back", cases Take_back);
      ("panic", [ Alcotest.test_case "induced internal panics" `Quick test_induced_panics ]);
    ]
