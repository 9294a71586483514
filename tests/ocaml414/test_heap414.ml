(* Shared-heap values under the OCaml runtime's GC and compactor (issue 11),
   written for the OCaml 4.14 run of scripts/test-ocaml414.sh (which builds
   this file, and only it does: its dune file is dune.in). It needs no test
   library; every check raises [Check] and the exit code is non-zero when
   one failed. Modes (argv.(1)):

   - [all]: (a) heap values referenced from private lists, arrays,
     records and hash tables across Gc.full_major, Gc.compact and
     automatic compactions (max_overhead 0) under private allocation
     pressure; (b) ordinary OCaml mutation inside [modify] (record fields,
     Array.set/fill/blit, Bytes.set, float fields) storing heap values and
     immediates, then collections and compactions and content checks;
     (c) the issue's loop, 10 KB [Netmcore_ref.assign] x [iters] holding
     [deref_ro] and [deref_p] values, with explicit and automatic
     compaction; (d) the same loop in Netmcore workers (fork), two at once.
   - [loop ours N] / [loop ocamlnet N]: only the issue's loop, with default
     GC settings (compaction when the runtime decides, as in the issue),
     on our [Netmcore_ref] or on OCamlnet's, printing the iteration reached
     and the compactions seen; exit 0 at the end of the loop. The original
     is expected to die (SIGSEGV) at its first compaction.

   [drop-stale] (after [all] or a loop): the loops empty their private
   references before each assign, so that no private field ever holds the
   address of a block our heap GC has freed and reused. Such a stale
   reference is harmless with naked pointers allowed (the runtime never
   reads through it) but not with the no-naked-pointers runtime, whose
   GC reads and may mark whatever now lies there (docs/design-heap.md,
   1.5); the script runs both runtime variants with it.

   Every pool is named on stdout ("shm NAME") and unlinked at exit (also
   after a failed check); after a crash (no at_exit runs: OCamlnet's loop,
   the broken variant) the script removes the named pools. *)

exception Check of string

let failures = ref 0

let check what cond = if not cond then raise (Check what)
let checkf fmt = Printf.ksprintf (fun what cond -> check what cond) fmt

let section name f =
  Printf.printf "== %s\n%!" name;
  match f () with
  | () -> Printf.printf "   ok: %s\n%!" name
  | exception e ->
      incr failures;
      Printf.printf "   FAILED: %s: %s\n%!" name (match e with Check w -> w | e -> Printexc.to_string e)

module H = Shmpool_netmcore.Netmcore_heap
module R = Shmpool_netmcore.Netmcore_ref
module M = Shmpool_netmcore.Netmcore_mempool

let master = Unix.getpid ()
let made = ref []
let () = at_exit (fun () -> if Unix.getpid () = master then List.iter (fun f -> try f () with _ -> ()) !made)

(* The address range of a Netmcore pool (ours and OCamlnet's are both a
   preallocated shm resource). *)
let pool_range id =
  match (Netmcore.get_resource id)#repr with
  | `Posix_shm_preallocated_sc (_, m, _) ->
      let a = Netsys_mem.memory_address m in
      (a, Nativeint.add a (Nativeint.of_int (Bigarray.Array1.dim m)))
  | _ -> failwith "pool_range: not a preallocated shm resource"

let in_range (lo, hi) v =
  Obj.is_block (Obj.repr v)
  &&
  let a = Netsys_mem.obj_address (Obj.repr v) in
  a >= lo && a < hi

let compactions () = (Gc.quick_stat ()).Gc.compactions

(* Private garbage, a third of it kept until the next call: fragments the
   private major heap so that compactions have something to move. *)
let kept = ref [||]

let pressure round n =
  let k = Array.make n [||] in
  for i = 0 to n - 1 do
    let a = Array.make (1 + ((i * 7) + round) mod 50) (string_of_int i) in
    if i mod 3 = 0 then k.(i) <- a
  done;
  kept := k

let with_gc settings f =
  let saved = Gc.get () in
  Gc.set settings;
  Fun.protect ~finally:(fun () -> Gc.set saved) f

(* max_overhead 0: the runtime compacts at the end of every major cycle
   (documented in gc.mli); nothing in the test calls Gc.compact then. *)
let auto_compact () = { (Gc.get ()) with Gc.max_overhead = 0; space_overhead = 40 }

let new_pool mb =
  let id = M.create_mempool (mb * 1024 * 1024) in
  (* named for the script, which removes what a crash leaves *)
  Printf.printf "shm %s\n%!" (M.shm_name id);
  made := (fun () -> M.unlink_mempool id) :: !made;
  id

(* (a) ---------------------------------------------------------------- *)

type item = { id : int; label : string; tags : string list; nums : float array }
type holder = { mutable cur : item; mutable prev : item option; mutable hlabel : string }

let item_ok i it = it.id = i && it.label = Printf.sprintf "item %d" i && it.tags = [ string_of_int i; "t" ] && Array.length it.nums = 3 && it.nums.(2) = float i

let section_a () =
  let p = new_pool 64 in
  let range = pool_range p in
  let n = 3000 in
  let mk i = { id = i; label = Printf.sprintf "item %d" i; tags = [ string_of_int i; "t" ]; nums = [| 0.; 1.; float i |] } in
  let h = H.create_heap p 4096 (Array.make n (mk 0)) in
  H.modify h (fun m -> for i = 0 to n - 1 do (H.root h).(i) <- H.add m (mk i) done);
  let heap_items = Array.init n (fun i -> (H.root h).(i)) in
  (* private structures, each pointing into the heap *)
  let lst = Array.to_list heap_items in
  let arr = Array.map (fun it -> it.label) heap_items in
  let holders = Array.init 100 (fun i -> { cur = heap_items.(i); prev = Some heap_items.(i + 1); hlabel = heap_items.(i + 2).label }) in
  let by_id = Hashtbl.create 64 in
  Array.iter (fun it -> Hashtbl.replace by_id it.id it) heap_items;
  (* heap strings as keys: hashing and compare see their contents (the
     pool is registered as static data) *)
  let by_label = Hashtbl.create 64 in
  Array.iter (fun it -> Hashtbl.replace by_label it.label it.id) heap_items;
  check "heap items are in the pool" (Array.for_all (in_range range) heap_items);
  let verify round =
    List.iteri (fun i it -> checkf "round %d: list item %d intact and in the pool" round i (item_ok i it && in_range range it)) lst;
    Array.iteri (fun i s -> checkf "round %d: array string %d" round i (s = Printf.sprintf "item %d" i && in_range range s)) arr;
    Array.iteri
      (fun i hd ->
        checkf "round %d: holder %d" round i
          (hd.cur == heap_items.(i) && item_ok i hd.cur
          && (match hd.prev with Some x -> item_ok (i + 1) x && in_range range x | None -> false)
          && hd.hlabel = Printf.sprintf "item %d" (i + 2) && in_range range hd.hlabel))
      holders;
    for i = 0 to n - 1 do
      checkf "round %d: Hashtbl by id %d" round i (item_ok i (Hashtbl.find by_id i) && Hashtbl.find by_id i == heap_items.(i));
      (* a private key equal to a heap key *)
      checkf "round %d: Hashtbl by heap label %d" round i (Hashtbl.find by_label (Printf.sprintf "item %d" i) = i)
    done;
    checkf "round %d: root array still the heap items" round (Array.for_all2 ( == ) (H.root h) heap_items)
  in
  let c0 = compactions () in
  for round = 1 to 40 do
    pressure round 3000;
    (* private fields updated with heap values (caml_modify on a private
       field, shm value) *)
    Array.iteri (fun i hd -> hd.prev <- Some heap_items.(i + 1); hd.hlabel <- heap_items.(i + 2).label) holders;
    if round mod 4 = 0 then Gc.compact () else Gc.full_major ();
    verify round
  done;
  let explicit = compactions () - c0 in
  let c1 = compactions () in
  with_gc (auto_compact ()) (fun () ->
      for round = 41 to 80 do
        pressure round 6000;
        verify round
      done);
  let auto = compactions () - c1 in
  Printf.printf "   %d explicit compactions, %d automatic ones (max_overhead 0), 80 verified rounds\n%!" explicit auto;
  check "explicit compactions happened" (explicit >= 10);
  check "automatic compactions happened" (auto >= 5);
  H.destroy h

(* (b) ---------------------------------------------------------------- *)

type node = { mutable name : string; mutable next : node option; mutable count : int; mutable weight : float; vals : string array; mutable fl : float array }

let section_b () =
  let p = new_pool 64 in
  let range = pool_range p in
  let n = 200 in
  let blank = { name = ""; next = None; count = 0; weight = 0.; vals = [||]; fl = [||] } in
  let h = H.create_heap p 4096 (Array.make n blank) in
  H.modify h (fun m ->
      let r = H.root h in
      for i = 0 to n - 1 do
        r.(i) <- H.add m { blank with name = "n" ^ string_of_int i; vals = Array.make 8 ""; fl = Array.make 4 0. }
      done);
  let nodes = Array.copy (H.root h) in
  (* private references into the heap, updated as we go *)
  let held_names = Array.map (fun nd -> nd.name) nodes in
  let expected_name = Array.copy held_names in
  let c0 = compactions () in
  let rounds = 300 in
  let step round =
    H.modify h (fun m ->
        let r = H.root h in
        for k = 0 to 9 do
          let i = ((round * 10) + k) mod n in
          let nd = r.(i) in
          (* a heap value into a mutable field *)
          let s = H.add m (Printf.sprintf "name %d/%d" round i) in
          nd.name <- s;
          expected_name.(i) <- s;
          (* an immediate, a float (unboxed in the record? no: mixed record,
             boxed float: a heap float), a heap option *)
          nd.count <- round;
          nd.weight <- H.add m (float round);
          nd.next <- (if k mod 2 = 0 then H.add_some m r.((i + 1) mod n) else None);
          (* Array.set of heap values, Array.fill and Array.blit between
             heap arrays *)
          nd.vals.(0) <- s;
          nd.vals.(1) <- H.add m (String.make (round mod 40) 'v');
          Array.fill nd.vals 2 3 nd.vals.(1);
          Array.blit nd.vals 0 nd.vals 5 2;
          (* unboxed stores: float array slots, bytes of a heap string *)
          nd.fl.(round mod 4) <- float (round * 3);
          let b = H.add_string m 4 in
          Bytes.set (Bytes.unsafe_of_string b) 0 'z';
          nd.vals.(7) <- b
        done;
        (* a new float array replacing an old one, immediates into the
           root array are not allowed (it holds records): swap two slots *)
        let a = round mod n and b = (round + 7) mod n in
        let t = r.(a) in
        r.(a) <- r.(b);
        r.(b) <- t;
        let tn = expected_name.(a) in
        expected_name.(a) <- expected_name.(b);
        expected_name.(b) <- tn;
        let ti = nodes.(a) in
        nodes.(a) <- nodes.(b);
        nodes.(b) <- ti);
    (* private data pointing into the heap *)
    Array.iteri (fun i nd -> held_names.(i) <- nd.name) (H.root h);
    pressure round 2000;
    if round mod 25 = 0 then (H.gc h; Gc.compact ()) else if round mod 5 = 0 then Gc.full_major ()
  in
  let verify round =
    let r = H.root h in
    Array.iteri
      (fun i nd ->
        checkf "round %d: node %d is the one we put there" round i (nd == nodes.(i) && in_range range nd);
        checkf "round %d: node %d name" round i (nd.name == expected_name.(i) && held_names.(i) == nd.name && in_range range nd.name);
        if nd.count > 0 then
          checkf "round %d: node %d vals" round i
            (nd.vals.(0) == nd.name && nd.vals.(2) == nd.vals.(1) && nd.vals.(4) == nd.vals.(1) && nd.vals.(5) == nd.vals.(0)
            && String.length nd.vals.(1) = nd.count mod 40 && String.for_all (( = ) 'v') nd.vals.(1)
            && Array.for_all (in_range range) nd.vals);
        (match nd.next with
        | Some x -> checkf "round %d: node %d next in heap" round i (in_range range x && Array.exists (fun y -> y == x) r)
        | None -> ());
        checkf "round %d: node %d float field in heap" round i (nd.weight = float nd.count && (nd.count = 0 || in_range range nd.weight)))
      r
  in
  with_gc (auto_compact ()) (fun () ->
      for round = 1 to rounds do
        step round;
        if round mod 10 = 0 then verify round
      done);
  Gc.compact ();
  verify rounds;
  let last = H.root h in
  check "floats written in place" (Array.exists (fun nd -> nd.fl.(rounds mod 4) = float (rounds * 3)) last);
  check "byte written in place" (Array.for_all (fun nd -> nd.count = 0 || nd.vals.(7).[0] = 'z') last);
  let c = compactions () - c0 in
  Printf.printf "   %d rounds of mutation, %d compactions\n%!" rounds c;
  check "compactions happened" (c >= 20);
  H.destroy h

(* (c) ---------------------------------------------------------------- *)

(* The issue's loop on any Netmcore_ref: assign 10 KB strings, hold what
   deref_ro returns in private data, compare; [on_iter] may collect. The
   current value must be intact and in the pool after every step. *)
module Loop (Ref : sig
  type 'a sref

  val sref : Netmcore.res_id -> 'a -> 'a sref
  val assign : 'a sref -> 'a -> unit
  val deref_ro : 'a sref -> 'a
  val deref_p : 'a sref -> ('a -> 'b) -> 'b
end) =
struct
  (* [drop_stale]: no private reference to a value survives its
     replacement (keep and the ring are emptied before each assign), so
     no private field ever holds the address of a block our GC freed. *)
  let run ?(report = 0) ?(compact_in_deref_p = true) ?(drop_stale = false) ~pool ~iters ~on_iter () =
    let range = pool_range pool in
    let r = Ref.sref pool (String.make 10_000 'a') in
    let keep = ref (Ref.deref_ro r) in
    let ring = Array.make 8 !keep in
    let ch i = Char.chr (97 + (i mod 26)) in
    for i = 1 to iters do
      if drop_stale then begin
        keep := "";
        Array.fill ring 0 8 ""
      end;
      Ref.assign r (String.make 10_000 (ch i));
      keep := Ref.deref_ro r;
      ring.(i mod 8) <- !keep;
      on_iter i;
      (* private allocation after the assign: where an automatic
         compaction may run *)
      ignore (Sys.opaque_identity (String.make 5_000 'p'));
      checkf "iteration %d: held deref_ro value in the pool" i (in_range range !keep);
      checkf "iteration %d: held deref_ro value intact" i (String.length !keep = 10_000 && !keep.[0] = ch i && !keep.[9_999] = ch i);
      if i mod 100 = 0 then
        Ref.deref_p r (fun v ->
            if compact_in_deref_p then Gc.compact ();
            checkf "iteration %d: deref_p value intact across Gc.compact" i (v == !keep && v.[5000] = ch i && in_range range v));
      if report > 0 && i mod report = 0 then Printf.printf "iteration %d, compactions %d\n%!" i (compactions ())
    done;
    check "ring holds the last value" (ring.(iters mod 8) == Ref.deref_ro r)
end

module Loop_ours = Loop (R)
module Loop_orig = Loop (Netmcore_ref)

let section_c ~iters ~drop_stale () =
  let p = new_pool 64 in
  let c0 = compactions () in
  (* explicit compactions every 250 iterations, full majors every 50, and
     automatic compaction between (max_overhead 0) *)
  with_gc (auto_compact ()) (fun () ->
      Loop_ours.run ~drop_stale ~pool:p ~iters ~on_iter:(fun i -> if i mod 250 = 0 then Gc.compact () else if i mod 50 = 0 then Gc.full_major ()) ());
  let c = compactions () - c0 in
  Printf.printf "   %d iterations of a 10 KB assign, %d compactions\n%!" iters c;
  check "compactions happened" (c >= iters / 250)

(* (d) ---------------------------------------------------------------- *)

let worker (pool, iters, k, drop_stale) =
  try
    let c0 = compactions () in
    with_gc (auto_compact ()) (fun () ->
        Loop_ours.run ~drop_stale ~pool ~iters ~on_iter:(fun i -> if (i + k) mod 200 = 0 then Gc.compact ()) ());
    Ok (compactions () - c0)
  with e -> Error (match e with Check w -> w | e -> Printexc.to_string e)

let worker_fork, worker_join = Netmcore_process.def_process worker

let first (pool, iters, drop_stale) =
  let ws = List.init 2 (fun k -> Netmcore_process.start ~inherit_resources:`All worker_fork (pool, iters, k * 100, drop_stale)) in
  List.map (fun w -> match Netmcore_process.join worker_join w with Some r -> r | None -> Error "worker gave no result") ws

let first_fork, first_join = Netmcore_process.def_process first

let section_d ~iters ~drop_stale () =
  let p = new_pool 64 in
  let dir = Testutil_mcore.sockdir "shmpool-h414" in
  (* two workers, each its own sref on the shared pool *)
  match Testutil_mcore.netmcore_run dir first_fork first_join (p, iters, drop_stale) with
  | None -> check "Netmcore.run returned a result" false
  | Some results ->
      List.iteri
        (fun k r ->
          match r with
          | Ok c ->
              Printf.printf "   worker %d: %d iterations, %d compactions\n%!" k iters c;
              checkf "worker %d compactions happened" k (c >= iters / 200)
          | Error e -> checkf "worker %d: %s" k e false)
        results

(* ------------------------------------------------------------------ *)

let () =
  Printf.printf "OCaml %s, word size %d\n%!" Sys.ocaml_version Sys.word_size;
  match Array.to_list Sys.argv |> List.tl with
  | [ "loop"; which; n ] | [ "loop"; which; n; "drop-stale" ] ->
      let drop_stale = Array.length Sys.argv = 5 in
      let iters = int_of_string n in
      let p =
        if which = "ocamlnet" then begin
          let id = Netmcore_mempool.create_mempool (64 * 1024 * 1024) in
          made := (fun () -> Netmcore_mempool.unlink_mempool id) :: !made;
          Printf.printf "shm %s\n%!" (Netmcore_mempool.shm_name id);
          id
        end
        else new_pool 64
      in
      let run = if which = "ocamlnet" then Loop_orig.run else Loop_ours.run in
      (match run ~report:1 ~compact_in_deref_p:false ~drop_stale ~pool:p ~iters ~on_iter:ignore () with
      | () -> Printf.printf "%s loop survived %d iterations, %d compactions\n%!" which iters (compactions ())
      | exception Check w ->
          Printf.printf "%s loop FAILED: %s (compactions %d)\n%!" which w (compactions ());
          exit 1)
  | [] | [ "all" ] | [ "all"; "drop-stale" ] ->
      let drop_stale = Array.length Sys.argv = 3 in
      let iters = try int_of_string (Sys.getenv "SHMPOOL_414_ITERS") with Not_found -> 12_000 in
      section "(a) heap values held in private data: full_major, compact, automatic compaction" section_a;
      section "(b) OCaml mutation inside modify, then collections and compactions" section_b;
      section (Printf.sprintf "(c) %d x 10 KB Netmcore_ref.assign holding deref_ro/deref_p, compacting" iters) (section_c ~iters ~drop_stale);
      section "(d) the same loop in two Netmcore workers at once" (section_d ~iters:(iters / 4) ~drop_stale);
      Printf.printf "test_heap414: %d passed, %d failed\n%!" (4 - !failures) !failures;
      exit (if !failures = 0 then 0 else 1)
  | _ ->
      prerr_endline "usage: test_heap414.exe [all [drop-stale] | loop (ours|ocamlnet) ITERATIONS [drop-stale]]";
      exit 2
