(* Netmcore_hashtbl, _queue and _array through real Netmcore workers.
   Differential, on both implementations (one functor, two instances):
   workers attach by descriptor and add to one hashtable and one queue at
   the same time (contended), and to tables of their own (disjoint);
   nothing is lost or duplicated, and the queue keeps each producer's
   order. Then, ours only (the original hangs for good): a worker doing
   random operations on a hashtable, a queue and an array is SIGKILLed at
   random moments, again and again; after each kill another worker must
   get through, and find every structure consistent ([length] equals what
   [iter] sees, no element half there, the queue a run of consecutive
   numbers: no operation half done). *)

let nworkers = 3
let rounds = 400

module Diff (I : sig
  val create_mempool : int -> Netmcore.res_id
  val unlink_mempool : Netmcore.res_id -> unit

  module T : sig
    type ('a, 'b, 'h) t
    type ('a, 'b, 'h) t_descr

    val create : Netmcore.res_id -> 'h -> ('a, 'b, 'h) t
    val add : ('a, 'b, 'h) t -> 'a -> 'b -> unit
    val replace : ('a, 'b, 'h) t -> 'a -> 'b -> unit
    val find_c : ('a, 'b, 'h) t -> 'a -> 'b
    val iter : ('a -> 'b -> unit) -> ('a, 'b, 'h) t -> unit
    val length : ('a, 'b, 'h) t -> int
    val descr_of_hashtbl : ('a, 'b, 'h) t -> ('a, 'b, 'h) t_descr
    val hashtbl_of_descr : Netmcore.res_id -> ('a, 'b, 'h) t_descr -> ('a, 'b, 'h) t
  end

  module Q : sig
    type ('e, 'h) squeue
    type ('e, 'h) squeue_descr

    exception Empty

    val create : Netmcore.res_id -> 'h -> ('e, 'h) squeue
    val push : 'e -> ('e, 'h) squeue -> unit
    val pop_c : ('e, 'h) squeue -> 'e
    val length : ('e, 'h) squeue -> int
    val descr_of_squeue : ('e, 'h) squeue -> ('e, 'h) squeue_descr
    val squeue_of_descr : Netmcore.res_id -> ('e, 'h) squeue_descr -> ('e, 'h) squeue
  end
end) =
struct
  type tbl = (string, int list, unit) I.T.t_descr
  type que = (int * int, unit) I.Q.squeue_descr

  (* Worker i: [rounds] keys of its own into the shared table and into a
     table of its own, (i, k) into the shared queue. *)
  let worker (pool, (shared : tbl), (own : tbl), (q : que), i) =
    try
      let t = I.T.hashtbl_of_descr pool shared and o = I.T.hashtbl_of_descr pool own in
      let q = I.Q.squeue_of_descr pool q in
      for k = 1 to rounds do
        I.T.add t (Printf.sprintf "%d/%d" i k) [ i; k ];
        I.T.replace o (string_of_int k) [ k ];
        I.Q.push (i, k) q
      done;
      Ok (I.T.length o)
    with e -> Error (Printexc.to_string e)

  let worker_fork, worker_join = Netmcore_process.def_process worker

  let first (pool, shared, owns, q) =
    let ws =
      List.mapi
        (fun i own -> Netmcore_process.start ~inherit_resources:`All worker_fork (pool, shared, own, q, i))
        owns
    in
    List.map (fun w -> match Netmcore_process.join worker_join w with Some r -> r | None -> Error "no result") ws

  let first_fork, first_join = Netmcore_process.def_process first

  let run netmcore_run =
    let pool = I.create_mempool (32 * 1024 * 1024) in
    Fun.protect ~finally:(fun () -> try I.unlink_mempool pool with _ -> ()) (fun () ->
        let t = I.T.create pool () in
        let owns = List.init nworkers (fun _ -> I.T.create pool ()) in
        let q = I.Q.create pool () in
        let results =
          netmcore_run first_fork first_join
            (pool, I.T.descr_of_hashtbl t, List.map I.T.descr_of_hashtbl owns, I.Q.descr_of_squeue q)
        in
        let seen = ref 0 and good = ref true in
        I.T.iter
          (fun k v ->
            incr seen;
            match v with [ i; j ] -> if k <> Printf.sprintf "%d/%d" i j then good := false | _ -> good := false)
          t;
        let all_found =
          List.for_all
            (fun i -> List.for_all (fun k -> I.T.find_c t (Printf.sprintf "%d/%d" i k) = [ i; k ]) (List.init rounds succ))
            (List.init nworkers Fun.id)
        in
        let qlen = I.Q.length q in
        let last = Array.make nworkers 0 and in_order = ref true in
        (try
           while true do
             let i, k = I.Q.pop_c q in
             if k <> last.(i) + 1 then in_order := false;
             last.(i) <- k
           done
         with I.Q.Empty -> ());
        ( results,
          (I.T.length t, !seen, !good && all_found),
          (qlen, !in_order && Array.for_all (( = ) rounds) last),
          List.map I.T.length owns ))
end

module D_orig = Diff (struct
  let create_mempool n = Netmcore_mempool.create_mempool n
  let unlink_mempool = Netmcore_mempool.unlink_mempool

  module T = Netmcore_hashtbl
  module Q = Netmcore_queue
end)

module D_ours = Diff (struct
  let create_mempool n = Shmpool_netmcore.Netmcore_mempool.create_mempool n
  let unlink_mempool = Shmpool_netmcore.Netmcore_mempool.unlink_mempool

  module T = Shmpool_netmcore.Netmcore_hashtbl
  module Q = Shmpool_netmcore.Netmcore_queue
end)

(* Kills, ours only. *)
module M = Shmpool_netmcore.Netmcore_mempool
module T = Shmpool_netmcore.Netmcore_hashtbl
module Q = Shmpool_netmcore.Netmcore_queue
module A = Shmpool_netmcore.Netmcore_array
module B = Shmpool_netmcore.Netmcore_buffer
module X = Shmpool_netmcore.Netmcore_matrix

let ps = Shmpool.page_size

let get, set = Testutil_mcore.(get, set)
let wait_until what f = Testutil_mcore.wait_until ~timeout:60.0 ~poll:0.0005 what f

type structs = {
  tbl : (int, string, unit) T.t_descr;
  que : (int, unit) Q.squeue_descr;
  arr : (int * string, unit) A.sarray_descr;
  buf : unit B.buffer_descr;
  mat : (int * string, unit) X.sarray2_descr;
}

(* The buffer holds consecutive 8-byte records "%07d;"; the victim adds
   batches of them and deletes whole records from the front. *)
let record i = Printf.sprintf "%07d;" (i mod 10_000_000)

let records b =
  let c = B.contents b in
  if String.length c mod 8 <> 0 || B.start b mod 8 <> 0 then failwith "buffer: a record half there";
  List.init (String.length c / 8) (fun i ->
      let r = String.sub c (i * 8) 8 in
      if r.[7] <> ';' then failwith "buffer: a record half there";
      int_of_string (String.sub r 0 7))

(* A value tied to its key, so a half-written binding shows. *)
let v_of k = String.make (k mod 300) (Char.chr (65 + (k mod 26)))
let elt k = (k, v_of k)

(* The queue holds consecutive numbers: the victim pushes the next number
   after the last and pops from the front; [slot 2] of the shared page is
   the next number to push, read back from the queue after a kill. *)
let victim (pool, s, mb_addr, seed) =
  let mb = Netsys_mem.grab mb_addr ps in
  let t = T.hashtbl_of_descr pool s.tbl and q = Q.squeue_of_descr pool s.que in
  let a = A.sarray_of_descr pool s.arr in
  let b = B.buffer_of_descr pool s.buf and x = X.sarray2_of_descr pool s.mat in
  let rnext = ref (match List.rev (records b) with r :: _ -> r + 1 | [] -> get mb 3) in
  Random.init seed;
  set mb 0 (Unix.getpid ());
  let next = ref (Q.fold (fun _ x -> x + 1) 0 q) in
  if !next = 0 then next := get mb 2;
  let n = ref 0 in
  while true do
    incr n;
    let k = Random.int 3000 in
    (match Random.int 10 with
    | 0 | 1 -> T.add t k (v_of k)
    | 2 -> T.replace t k (v_of k)
    | 3 -> T.remove t k
    | 4 | 5 ->
        Q.push !next q;
        incr next;
        set mb 2 !next
    | 6 -> ( try ignore (Q.pop_p q (fun x -> x)) with Q.Empty -> ())
    | 7 -> A.set a (k mod A.length a) (elt k)
    | 8 when Random.bool () ->
        if Random.int 3 = 0 then B.delete_hd b (min (B.length b) (8 * Random.int 60))
        else begin
          B.add_string b (String.concat "" (List.init (1 + Random.int 700) (fun i -> record (!rnext + i))));
          rnext := (match List.rev (records b) with r :: _ -> r + 1 | [] -> !rnext);
          set mb 3 !rnext
        end
    | 8 when Random.bool () -> X.set x (k mod 7) (k mod 5) (elt k)
    | _ -> if Random.int 50 = 0 then A.grow a (A.length a + 1 + Random.int 100) (elt 7) else if Random.int 200 = 0 then T.clear t);
    set mb 1 !n
  done

let victim_fork, victim_join = Netmcore_process.def_process victim

let check pool s =
  let t = T.hashtbl_of_descr pool s.tbl and q = Q.squeue_of_descr pool s.que in
  let a = A.sarray_of_descr pool s.arr in
  let seen = ref 0 in
  T.iter
    (fun k v ->
      incr seen;
      if v <> v_of k then failwith (Printf.sprintf "binding %d half there" k))
    t;
  if !seen <> T.length t then failwith (Printf.sprintf "hashtbl: length %d, iter %d" (T.length t) !seen);
  let l = List.rev (Q.fold (fun acc x -> x :: acc) [] q) in
  if List.length l <> Q.length q then failwith (Printf.sprintf "queue: length %d, iter %d" (Q.length q) (List.length l));
  (match l with
  | [] -> ()
  | x :: rest -> ignore (List.fold_left (fun p y -> if y <> p + 1 then failwith "queue: not consecutive"; y) x rest));
  Array.iter (fun (k, v) -> if v <> v_of k then failwith "array: element half there") (A.deref a);
  let b = B.buffer_of_descr pool s.buf and x = X.sarray2_of_descr pool s.mat in
  let rs = records b in
  (match rs with
  | [] -> ()
  | r :: rest -> ignore (List.fold_left (fun p y -> if y <> p + 1 then failwith "buffer: records not consecutive"; y) r rest));
  Array.iter (Array.iter (fun (k, v) -> if v <> v_of k then failwith "matrix: element half there")) (X.deref x);
  B.add_string b (record (match List.rev rs with r :: _ -> r + 1 | [] -> 0));
  X.set x 0 0 (elt 0);
  (* a full operation of each kind goes through after the death *)
  T.replace t 1 (v_of 1);
  if T.find_c t 1 <> v_of 1 then failwith "hashtbl unusable";
  (match l with [] -> () | _ -> Q.push (List.nth l (List.length l - 1) + 1) q);
  A.set a 0 (elt 0);
  let rec_ h = (Shmpool_netmcore.Netmcore_heap.stats h).Shmpool_netmcore.Netmcore_heap.recoveries in
  (!seen, List.length l, rec_ (T.heap t) + rec_ (Q.heap q) + rec_ (A.heap a) + rec_ (B.heap b) + rec_ (X.heap x))


(* Staged death: a worker kills itself at one commit point of one
   operation; another process then finds the operation done entirely
   (points after the commit) or not at all (points before it), the
   derived fields repaired, and the structure usable. *)
let int_list q = List.rev (Q.fold (fun acc x -> x :: acc) [] q)

let tbl_sound t =
  let n = ref 0 in
  T.iter (fun _ _ -> incr n) t;
  !n = T.length t

type case = { point : string; setup : (int, string, unit) T.t -> (int, unit) Q.squeue -> (int * string, unit) A.sarray -> unit; act : (int, string, unit) T.t -> (int, unit) Q.squeue -> (int * string, unit) A.sarray -> unit; expect : (int, string, unit) T.t -> (int, unit) Q.squeue -> (int * string, unit) A.sarray -> bool }

let nothing _ _ _ = ()

(* The buffer of the staged case (set in both processes before [act] and
   [expect]). *)
let cur_buf : unit B.buffer option ref = ref None
let cbuf () = Option.get !cur_buf

let cases =
  [
    { point = "hashtbl.add"; setup = nothing; act = (fun t _ _ -> T.add t 5 (v_of 5)); expect = (fun t _ _ -> T.find_all_c t 5 = [ v_of 5 ] && T.length t = 1 && tbl_sound t) };
    { point = "hashtbl.remove"; setup = (fun t _ _ -> T.add t 5 "a"; T.add t 5 "b"); act = (fun t _ _ -> T.remove t 5); expect = (fun t _ _ -> T.find_all_c t 5 = [ "a" ] && T.length t = 1 && tbl_sound t) };
    { point = "hashtbl.clear"; setup = (fun t _ _ -> for k = 1 to 10 do T.add t k (v_of k) done); act = (fun t _ _ -> T.clear t); expect = (fun t _ _ -> T.length t = 0 && tbl_sound t) };
    { point = "hashtbl.resize"; setup = (fun t _ _ -> for k = 1 to 782 do T.add t k (v_of k) done); act = (fun t _ _ -> T.add t 783 (v_of 783));
      expect = (fun t _ _ -> T.length t = 783 && tbl_sound t && List.for_all (fun k -> T.find_c t k = v_of k) (List.init 783 succ)) };
    { point = "queue.push"; setup = (fun _ q _ -> Q.push 0 q); act = (fun _ q _ -> Q.push 1 q); expect = (fun _ q _ -> Q.length q = 2 && int_list q = [ 0; 1 ] && (Q.push 2 q; int_list q = [ 0; 1; 2 ])) };
    { point = "queue.push"; setup = nothing; act = (fun _ q _ -> Q.push 1 q); expect = (fun _ q _ -> Q.length q = 1 && (Q.push 2 q; int_list q = [ 1; 2 ] && Q.length q = 2)) };
    { point = "queue.pop"; setup = (fun _ q _ -> Q.push 0 q; Q.push 1 q); act = (fun _ q _ -> ignore (Q.pop_c q)); expect = (fun _ q _ -> Q.length q = 1 && int_list q = [ 1 ]) };
    { point = "queue.pop"; setup = (fun _ q _ -> Q.push 0 q); act = (fun _ q _ -> Q.pop_p q ignore); expect = (fun _ q _ -> Q.length q = 0 && Q.is_empty q && (Q.push 2 q; int_list q = [ 2 ] && Q.length q = 1)) };
    { point = "queue.clear"; setup = (fun _ q _ -> Q.push 0 q; Q.push 1 q); act = (fun _ q _ -> Q.clear q); expect = (fun _ q _ -> Q.length q = 0 && (Q.push 2 q; int_list q = [ 2 ])) };
    { point = "buffer.add"; setup = (fun _ _ _ -> B.add_string (cbuf ()) (String.make 5000 'a'); B.delete_hd (cbuf ()) 4990);
      act = (fun _ _ _ -> B.add_string (cbuf ()) (String.make 9000 'b'));
      expect = (fun _ _ _ -> let b = cbuf () in B.start b = 4990 && B.contents b = String.make 10 'a' && (B.add_string b "c"; B.contents b = String.make 10 'a' ^ "c")) };
    (* points before the commit: the operation did not happen *)
    { point = "hashtbl.replace"; setup = (fun t _ _ -> T.add t 5 "a"); act = (fun t _ _ -> T.replace t 5 "b");
      expect = (fun t _ _ -> T.find_all_c t 5 = [ "a" ] && T.length t = 1 && tbl_sound t) };
    { point = "buffer.delete_hd"; setup = (fun _ _ _ -> B.add_string (cbuf ()) (String.make 5000 'a' ^ String.make 5000 'b'));
      act = (fun _ _ _ -> B.delete_hd (cbuf ()) 6000);
      expect = (fun _ _ _ -> let b = cbuf () in B.length b = 10000 && B.sub b (B.start b) 10000 = String.make 5000 'a' ^ String.make 5000 'b' && (B.delete_hd b 6000; B.contents b = String.make 4000 'b')) };
    { point = "array.grow"; setup = nothing; act = (fun _ _ a -> A.grow a 100 (elt 1)); expect = (fun _ _ a -> A.length a = 10 && A.get_c a 9 = elt 9 && (A.grow a 20 (elt 1); A.length a = 20)) };
  ]

let staged_victim (pool, s, i) =
  let c = List.nth cases i in
  cur_buf := Some (B.buffer_of_descr pool s.buf);
  Shmpool_netmcore.Struct_internal.commit_hook := (fun p -> if p = c.point then Unix.kill (Unix.getpid ()) Sys.sigkill);
  c.act (T.hashtbl_of_descr pool s.tbl) (Q.squeue_of_descr pool s.que) (A.sarray_of_descr pool s.arr);
  "not killed"

let staged_fork, staged_join = Netmcore_process.def_process staged_victim

let staged pool =
  List.mapi
    (fun i c ->
      let t = T.create pool () and q = Q.create pool () and a = A.init pool 10 elt () in
      let b = B.create pool 1 () in
      cur_buf := Some b;
      c.setup t q a;
      let s = { tbl = T.descr_of_hashtbl t; que = Q.descr_of_squeue q; arr = A.descr_of_sarray a; buf = B.descr_of_buffer b; mat = X.descr_of_sarray2 (X.make pool 1 1 (elt 0) ()) } in
      let r = Netmcore_process.join staged_join (Netmcore_process.start ~inherit_resources:`All staged_fork (pool, s, i)) in
      let ok = r = None && (try c.expect t q a with e -> prerr_endline (Printexc.to_string e); false) in
      (c.point, ok))
    cases

let staged_fork2, staged_join2 = Netmcore_process.def_process staged

let after (pool, s) = try Ok (check pool s) with e -> Error (Printexc.to_string e)
let after_fork, after_join = Netmcore_process.def_process after
let trials = 30

(* At least [trials] kills, more (up to [max_trials]) until one landed
   inside an operation (a heap recovered): how often a random kill does
   depends on how long the operations hold their lock, which a faster
   operation shortens. *)
let max_trials = 10 * trials

let kills (pool, s, mb_addr) =
  let mb = Netsys_mem.grab mb_addr ps in
  let one trial =
    set mb 0 0;
    set mb 1 0;
    let v = Netmcore_process.start ~inherit_resources:`All victim_fork (pool, s, mb_addr, trial) in
    wait_until "the victim's pid" (fun () -> get mb 0 <> 0);
    let target = Random.int 400 in
    wait_until "the victim's progress" (fun () -> get mb 1 >= target);
    for _ = 1 to Random.int 200_000 do
      ignore (Sys.opaque_identity (ref trial))
    done;
    Unix.kill (get mb 0) Sys.sigkill;
    ignore (Netmcore_process.join victim_join v);
    match Netmcore_process.join after_join (Netmcore_process.start ~inherit_resources:`All after_fork (pool, s)) with
    | Some r -> r
    | None -> Error "no result"
  in
  let rec go trial acc =
    let r = one trial in
    let recovered = match r with Ok (_, _, n) -> n > 0 | Error _ -> true in
    if trial + 1 >= max_trials || (trial + 1 >= trials && recovered) then List.rev (r :: acc) else go (trial + 1) (r :: acc)
  in
  go 0 []

let kills_fork, kills_join = Netmcore_process.def_process kills

let () =
  let sockdir = Testutil_mcore.sockdir "shmpool-structw" in
  let netmcore_run fp jp arg = Testutil_mcore.netmcore_run sockdir fp jp arg in
  let orig = D_orig.run netmcore_run in
  let ours = D_ours.run netmcore_run in
  let pool = M.create_mempool (64 * 1024 * 1024) in
  let kill_results =
    Fun.protect ~finally:(fun () -> try M.unlink_mempool pool with _ -> ()) (fun () ->
        let mb = M.alloc_mem pool ps in
        let s =
          {
            tbl = T.descr_of_hashtbl (T.create pool ());
            que = Q.descr_of_squeue (Q.create pool ());
            arr = A.descr_of_sarray (A.init pool 50 elt ());
            buf = B.descr_of_buffer (B.create pool 1 ());
            mat = X.descr_of_sarray2 (X.init pool 7 5 (fun i j -> elt ((i * 5) + j)) ());
          }
        in
        let r = netmcore_run kills_fork kills_join (pool, s, Netsys_mem.memory_address mb) in
        let st = netmcore_run staged_fork2 staged_join2 pool in
        (r, (try Ok (check pool s) with e -> Error (Printexc.to_string e)), Shmpool.check (Shmpool_netmcore.shmpool pool), st))
  in
  let open Alcotest in
  let diff_case name (results, (tlen, seen, good), (qlen, ordered), owns) =
    test_case name `Quick (fun () ->
        match results with
        | None -> fail "no result"
        | Some rs ->
            check (list (result int string)) "workers" (List.init nworkers (fun _ -> Ok rounds)) rs;
            check int "hashtbl length" (nworkers * rounds) tlen;
            check int "iter sees every binding once" (nworkers * rounds) seen;
            check bool "bindings intact and found" true good;
            check int "queue length" (nworkers * rounds) qlen;
            check bool "queue: each producer's order, nothing lost" true ordered;
            check (list int) "disjoint tables" (List.init nworkers (fun _ -> rounds)) owns)
  in
  run "netmcore structures workers"
    [
      ("differential", [ diff_case "ocamlnet" orig; diff_case "shmpool" ours ]);
      ( "kills",
        [
          test_case "SIGKILL mid-operation: consistent, never wedged" `Quick (fun () ->
              let r, final, chk, _ = kill_results in
              (match r with
              | None -> fail "no result"
              | Some rs ->
                  check bool "trials" true (List.length rs >= trials);
                  List.iteri (fun i r -> match r with Ok _ -> () | Error e -> failf "trial %d: %s" i e) rs;
                  let b, e = List.fold_left (fun (b, e) r -> match r with Ok (x, y, _) -> (b + x, e + y) | _ -> (b, e)) (0, 0) rs in
                  let recovered = match List.rev rs with Ok (_, _, n) :: _ -> n | _ -> 0 in
                  Printf.printf "kills: %d trials, %d killed holding a structure's lock, %d bindings and %d queue elements checked\n" (List.length rs) recovered b e;
                  check bool "some kills inside an operation" true (recovered > 0));
              (match final with Ok _ -> () | Error e -> failf "final check: %s" e);
              check (list string) "pool check" [] chk);
          test_case "staged death at each commit point" `Quick (fun () ->
              let _, _, _, st = kill_results in
              match st with
              | None -> fail "no result"
              | Some l ->
                  check (list (pair string bool)) "entirely or not at all, repaired"
                    (List.map (fun c -> (c.point, true)) cases) l);
        ] );
    ]
