(* A stand-in for the part of Alcotest that tests/ocaml uses, so that those
   suites compile and run on the OCaml 4.14 built by
   scripts/test-ocaml414.sh, where Alcotest (and its dozen dependencies) is
   not built. Same names and types for what the suites call; plainer
   output. Never part of the normal build (its dune file is dune.in, which
   only the script installs, in its own copy of the tree). *)

type 'a testable = { pp : 'a -> string; eq : 'a -> 'a -> bool }

exception Check_failure of string

let bool = { pp = string_of_bool; eq = ( = ) }
let int = { pp = string_of_int; eq = ( = ) }
let int64 = { pp = Int64.to_string; eq = ( = ) }
let string = { pp = (fun s -> Printf.sprintf "%S" s); eq = String.equal }
let char = { pp = (fun c -> Printf.sprintf "%C" c); eq = Char.equal }
let unit = { pp = (fun () -> "()"); eq = ( = ) }

let float eps =
  { pp = string_of_float; eq = (fun a b -> a = b || Float.abs (a -. b) <= eps || (Float.is_nan a && Float.is_nan b)) }

let list t =
  { pp = (fun l -> "[" ^ String.concat "; " (List.map t.pp l) ^ "]");
    eq = (fun a b -> List.length a = List.length b && List.for_all2 t.eq a b) }

let array t =
  let l = list t in
  { pp = (fun a -> "[|" ^ l.pp (Array.to_list a) ^ "|]"); eq = (fun a b -> l.eq (Array.to_list a) (Array.to_list b)) }

let option t =
  { pp = (function None -> "None" | Some x -> "Some " ^ t.pp x);
    eq = (fun a b -> match (a, b) with None, None -> true | Some x, Some y -> t.eq x y | _ -> false) }

let result a e =
  { pp = (function Ok x -> "Ok " ^ a.pp x | Error y -> "Error " ^ e.pp y);
    eq = (fun x y -> match (x, y) with Ok x, Ok y -> a.eq x y | Error x, Error y -> e.eq x y | _ -> false) }

let pair a b = { pp = (fun (x, y) -> Printf.sprintf "(%s, %s)" (a.pp x) (b.pp y)); eq = (fun (x, y) (x', y') -> a.eq x x' && b.eq y y') }

let triple a b c =
  { pp = (fun (x, y, z) -> Printf.sprintf "(%s, %s, %s)" (a.pp x) (b.pp y) (c.pp z));
    eq = (fun (x, y, z) (x', y', z') -> a.eq x x' && b.eq y y' && c.eq z z') }

let check t msg expected actual =
  if not (t.eq expected actual) then
    raise (Check_failure (Printf.sprintf "%s: expected %s, got %s" msg (t.pp expected) (t.pp actual)))

let fail msg = raise (Check_failure msg)
let failf fmt = Printf.ksprintf fail fmt

let check_raises msg exn f =
  match f () with
  | () -> fail (Printf.sprintf "%s: expected exception %s, none raised" msg (Printexc.to_string exn))
  | exception e when e = exn -> ()
  | exception e ->
      fail (Printf.sprintf "%s: expected exception %s, got %s" msg (Printexc.to_string exn) (Printexc.to_string e))

type speed_level = [ `Quick | `Slow ]
type 'a test_case = string * speed_level * ('a -> unit)

let test_case name speed f = (name, speed, f)

(* Runs every test, prints one line each and a summary, exits 0 only when
   all passed (as Alcotest.run does). The groups named in
   SHMPOOL_414_SKIP_GROUPS (comma-separated) are not run and counted as
   skipped, never as passed (for runs by hand). *)
let run ?argv:_ name suites =
  let passed = ref 0 and failed = ref 0 and skipped = ref 0 in
  let skip = try String.split_on_char ',' (Sys.getenv "SHMPOOL_414_SKIP_GROUPS") with Not_found -> [] in
  Printf.printf "Testing %s (OCaml %s, Alcotest stand-in)\n%!" name Sys.ocaml_version;
  List.iter
    (fun (group, cases) ->
      List.iteri
        (fun i (tname, _, f) ->
          if List.mem group skip then begin
            incr skipped;
            Printf.printf "  [SKIP] %s %d %s (SHMPOOL_414_SKIP_GROUPS)\n%!" group i tname
          end
          else
            match f () with
            | () ->
                incr passed;
                Printf.printf "  [OK]   %s %d %s\n%!" group i tname
            | exception e ->
                incr failed;
                let msg = match e with Check_failure m -> m | e -> Printexc.to_string e in
                Printf.printf "  [FAIL] %s %d %s: %s\n%!" group i tname msg)
        cases)
    suites;
  Printf.printf "%s: %d passed, %d failed, %d skipped\n%!" name !passed !failed !skipped;
  exit (if !failed = 0 then 0 else 1)
