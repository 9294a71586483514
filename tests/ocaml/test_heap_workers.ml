(* Netmcore_heap and Netmcore_ref through real Netmcore workers, on both
   implementations (one functor, two instances): workers attach by
   descriptor, see each other's writes, grow the heap, collect it; the
   master sees the result, and destroy gives the pool back what it had
   before create_heap. Then, ours only (the original hangs): workers
   SIGKILLed at random moments inside their modify loop; the next worker
   locks the heap without waiting forever and finds the last committed
   value. *)

let ps = Shmpool.page_size
let nworkers = 3
let rounds = 300

module Diff (I : sig
  val create_mempool : int -> Netmcore.res_id
  val unlink_mempool : Netmcore.res_id -> unit
  val stats : Netmcore.res_id -> int * int * int

  type 'a heap
  type 'a descr

  val create_heap : Netmcore.res_id -> int -> 'a -> 'a heap
  val root : 'a heap -> 'a
  val descr_of_heap : 'a heap -> 'a descr
  val heap_of_descr : Netmcore.res_id -> 'a descr -> 'a heap

  type mutator

  val modify : 'a heap -> (mutator -> 'r) -> 'r
  val add : mutator -> 'a -> 'a
  val with_value : 'a heap -> (unit -> 'b) -> ('b -> 'c) -> 'c
  val gc : 'a heap -> unit
  val destroy : 'a heap -> unit
end) =
struct
  type root = (int * int * string) list ref

  (* Worker i prepends (i, k, a string of k mod 50 bytes) for every k,
     collecting now and then, and returns what it read at the end. *)
  let worker (pool, (d : root I.descr), i) =
    try
      let h = I.heap_of_descr pool d in
      for k = 1 to rounds do
        I.modify h (fun m -> (I.root h) := I.add m ((i, k, String.make (k mod 50) 'x') :: !(I.root h)));
        if k mod 100 = 0 then I.gc h
      done;
      let mine = I.with_value h (fun () -> !(I.root h)) (List.filter (fun (j, _, _) -> j = i)) in
      Ok (List.length mine)
    with e -> Error (Printexc.to_string e)

  let worker_fork, worker_join = Netmcore_process.def_process worker

  let first (pool, d) =
    let ws = List.init nworkers (fun i -> Netmcore_process.start ~inherit_resources:`All worker_fork (pool, d, i)) in
    List.map
      (fun w -> match Netmcore_process.join worker_join w with Some r -> r | None -> Error "no result")
      ws

  let first_fork, first_join = Netmcore_process.def_process first

  (* In the master: the heap, the workers, what the root holds after. *)
  let run netmcore_run =
    let pool = I.create_mempool (16 * 1024 * 1024) in
    Fun.protect ~finally:(fun () -> try I.unlink_mempool pool with _ -> ()) (fun () ->
        let before = I.stats pool in
        let h = I.create_heap pool 4096 (ref [] : root) in
        let results = netmcore_run first_fork first_join (pool, I.descr_of_heap h) in
        let items = !(I.root h) in
        let per_worker = List.init nworkers (fun i -> List.length (List.filter (fun (j, _, _) -> j = i) items)) in
        let intact = List.for_all (fun (_, k, s) -> String.length s = k mod 50) items in
        I.gc h;
        I.destroy h;
        (results, per_worker, intact, before = I.stats pool))
end

module D_orig = Diff (struct
  let create_mempool n = Netmcore_mempool.create_mempool n
  let unlink_mempool = Netmcore_mempool.unlink_mempool
  let stats = Netmcore_mempool.stats

  include Netmcore_heap
end)

module D_ours = Diff (struct
  include Shmpool_netmcore.Netmcore_heap

  let create_mempool n = Shmpool_netmcore.Netmcore_mempool.create_mempool n
  let unlink_mempool = Shmpool_netmcore.Netmcore_mempool.unlink_mempool
  let stats = Shmpool_netmcore.Netmcore_mempool.stats
end)

(* Kills, ours only. *)
module H = Shmpool_netmcore.Netmcore_heap
module M = Shmpool_netmcore.Netmcore_mempool

let get, set = Testutil_mcore.(get, set)
let wait_until what f = Testutil_mcore.wait_until ~timeout:30.0 ~poll:0.0005 what f

(* The root: the list [n; n-1; ...; n-len+1] (consecutive), replaced
   whole at each step; the victim also grows the heap with big strings
   and collects. *)
let consecutive = function
  | [] -> true
  | x :: rest -> snd (List.fold_left (fun (p, ok) y -> (y, ok && y = p - 1)) (x, true) rest)

let victim (pool, d, mb_addr, seed) =
  let mb = Netsys_mem.grab mb_addr ps in
  let h : int list ref H.heap = H.heap_of_descr pool d in
  Random.init seed;
  set mb 0 (Unix.getpid ());
  let n = ref 0 in
  while true do
    incr n;
    H.modify h (fun m ->
        let cur = !(H.root h) in
        if not (consecutive cur) then failwith "victim: broken root";
        let len = 1 + Random.int 2000 in
        let top = Random.int 100_000 + len in
        H.root h := H.add m (List.init len (fun k -> top - k));
        if Random.int 4 = 0 then ignore (H.add m (String.make (Random.int 300_000) 'g'));
        if Random.int 10 = 0 then H.gc h);
    (* and reads under a pin, dying there too at times *)
    ignore (H.with_value h (fun () -> !(H.root h)) (fun l -> if not (consecutive l) then failwith "victim: pinned value broken"));
    set mb 1 !n
  done

let victim_fork, victim_join = Netmcore_process.def_process victim

(* After the kill: lock (bounded by the test's watchdog), check the root,
   write a new one. *)
let after (pool, d) =
  try
    let h : int list ref H.heap = H.heap_of_descr pool d in
    H.modify h (fun m ->
        let cur = !(H.root h) in
        if not (consecutive cur) then failwith "broken root after the kill";
        H.root h := H.add m [ 3; 2; 1 ]);
    H.gc h;
    let s = H.stats h in
    if s.H.pins <> 0 then failwith "a dead process's pin survived a gc";
    Ok s.H.recoveries
  with e -> Error (Printexc.to_string e)

let after_fork, after_join = Netmcore_process.def_process after

let trials = 12

let kills (pool, d, mb_addr) =
  let mb = Netsys_mem.grab mb_addr ps in
  List.init trials (fun t ->
      set mb 0 0;
      set mb 1 0;
      let v = Netmcore_process.start ~inherit_resources:`All victim_fork (pool, d, mb_addr, t) in
      wait_until "the victim's pid" (fun () -> get mb 0 <> 0);
      let target = t mod 5 in
      wait_until "the victim's progress" (fun () -> get mb 1 >= target);
      for _ = 1 to t * 2000 do
        ignore (Sys.opaque_identity (ref t))
      done;
      let pid = get mb 0 in
      Unix.kill pid Sys.sigkill;
      ignore (Netmcore_process.join victim_join v);
      (* Netmcore's join can return while the victim is still exiting (its
         sockets close before it becomes a zombie): until then it is alive,
         and its pin rightly survives a gc. Wait until it is really gone. *)
      wait_until "the victim's end" (fun () ->
          match open_in (Printf.sprintf "/proc/%d/stat" pid) with
          | exception Sys_error _ -> true
          | ic ->
              let l = try input_line ic with End_of_file -> "" in
              close_in ic;
              (match String.rindex_opt l ')' with
              | Some i when i + 2 < String.length l -> l.[i + 2] = 'Z' || l.[i + 2] = 'X'
              | _ -> false));
      match Netmcore_process.join after_join (Netmcore_process.start ~inherit_resources:`All after_fork (pool, d)) with
      | Some r -> r
      | None -> Error "no result")

let kills_fork, kills_join = Netmcore_process.def_process kills

let () =
  let sockdir = Testutil_mcore.sockdir "shmpool-heapw" in
  let netmcore_run fp jp arg = Testutil_mcore.netmcore_run sockdir fp jp arg in
  let orig = D_orig.run (fun fp jp a -> netmcore_run fp jp a) in
  let ours = D_ours.run (fun fp jp a -> netmcore_run fp jp a) in
  let pool = M.create_mempool (64 * 1024 * 1024) in
  let kill_results, kill_after =
    Fun.protect ~finally:(fun () -> try M.unlink_mempool pool with _ -> ()) (fun () ->
        let before = M.stats pool in
        let mb = M.alloc_mem pool ps in
        let h = H.create_heap pool 4096 (ref [ 1 ]) in
        let r = netmcore_run kills_fork kills_join (pool, H.descr_of_heap h, Netsys_mem.memory_address mb) in
        let sound = consecutive !(H.root h) in
        H.gc h;
        H.destroy h;
        M.free_mem pool mb;
        (* A victim killed between taking a block from the pool and handing
           it to the heap leaves a block of its own, which is reclaim_dead's
           by contract (the heap never saw it). *)
        ignore (Shmpool.reclaim_dead (Shmpool_netmcore.shmpool pool));
        let after = M.stats pool in
        if after <> before then begin
          let sp = Shmpool_netmcore.shmpool pool in
          prerr_string (Shmpool.debug_info sp);
          List.iter
            (fun (o : Shmpool.owner) ->
              Printf.eprintf "owner pid=%d alive=%b pages=%d blocks=%d\n" o.pid o.alive o.pages o.blocks)
            (Shmpool.owners sp)
        end;
        (r, (sound, (before, after), Shmpool.check (Shmpool_netmcore.shmpool pool))))
  in
  let open Alcotest in
  let diff_case name (results, per_worker, intact, restored) =
    test_case name `Quick (fun () ->
        match results with
        | None -> fail "no result"
        | Some rs ->
            check (list (result int string)) "workers" (List.init nworkers (fun _ -> Ok rounds)) rs;
            check (list int) "every addition visible" (List.init nworkers (fun _ -> rounds)) per_worker;
            check bool "contents intact" true intact;
            check bool "destroy restores the pool" true restored)
  in
  run "netmcore_heap workers"
    [
      ("differential", [ diff_case "ocamlnet" orig; diff_case "shmpool" ours ]);
      ( "kills",
        [
          test_case "SIGKILL in the modify loop never wedges the heap" `Quick (fun () ->
              match kill_results with
              | None -> fail "no result"
              | Some rs ->
                  check int "trials" trials (List.length rs);
                  List.iteri
                    (fun i r ->
                      match r with
                      | Ok _ -> ()
                      | Error e -> failf "trial %d: %s" i e)
                    rs;
                  let recovered = match List.rev rs with Ok n :: _ -> n | _ -> 0 in
                  Printf.printf "kills: %d trials, %d killed holding the heap lock\n" trials recovered;
                  let sound, (before, after), chk = kill_after in
                  check bool "root sound" true sound;
                  check (triple int int int) "destroy restores the pool" before after;
                  check (list string) "pool check" [] chk);
        ] );
    ]
