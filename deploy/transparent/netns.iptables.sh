#!/bin/sh
# taskgate transparent mode with iptables-legacy: the rules of netns.nft, for hosts that
# still use the legacy iptables (x_tables) backend. Run on the HOST as root.
#
#   AGENT_IF=veth-agent GATEWAY_PORT=8082 deploy/transparent/netns.iptables.sh add
#   AGENT_IF=veth-agent GATEWAY_PORT=8082 deploy/transparent/netns.iptables.sh delete
#
# IPTABLES / IP6TABLES name the binaries (default iptables-legacy, ip6tables-legacy).
set -eu

: "${AGENT_IF:?set AGENT_IF to the host side of the agent's veth pair}"
: "${GATEWAY_PORT:?set GATEWAY_PORT to the gateway's transparent port}"
ACTION=${1:?usage: $0 add|delete}
CHAIN="TG-$(printf %s "$AGENT_IF" | cut -c1-24)"   # one chain per agent interface

rules() {  # $1: iptables binary; then the ICMP types the link needs (IPv6 neighbours)
    ipt=$1
    shift
    case "$ACTION" in
    add)
        # Every TCP connection from the agent lands on the gateway's transparent port.
        $ipt -t nat -A PREROUTING -i "$AGENT_IF" -p tcp -j REDIRECT --to-ports "$GATEWAY_PORT"
        # From the agent only what was redirected reaches the host; nothing is forwarded.
        $ipt -N "$CHAIN"
        $ipt -A "$CHAIN" -p tcp --dport "$GATEWAY_PORT" -m conntrack --ctstate DNAT -j ACCEPT
        $ipt -A "$CHAIN" -m conntrack --ctstate RELATED -j ACCEPT
        for type in "$@"; do
            $ipt -A "$CHAIN" -p icmpv6 --icmpv6-type "$type" -j ACCEPT
        done
        $ipt -A "$CHAIN" -j DROP
        $ipt -I INPUT -i "$AGENT_IF" -j "$CHAIN"
        $ipt -I FORWARD -i "$AGENT_IF" -j DROP
        ;;
    delete)  # everything `add` made, whatever is left of it
        $ipt -t nat -D PREROUTING -i "$AGENT_IF" -p tcp -j REDIRECT \
            --to-ports "$GATEWAY_PORT" 2>/dev/null || true
        $ipt -D INPUT -i "$AGENT_IF" -j "$CHAIN" 2>/dev/null || true
        $ipt -D FORWARD -i "$AGENT_IF" -j DROP 2>/dev/null || true
        $ipt -F "$CHAIN" 2>/dev/null || true
        $ipt -X "$CHAIN" 2>/dev/null || true
        ;;
    *) echo "usage: $0 add|delete" >&2; exit 2 ;;
    esac
}

rules "${IPTABLES:-iptables-legacy}"
rules "${IP6TABLES:-ip6tables-legacy}" neighbour-solicitation neighbour-advertisement \
    router-solicitation
