function setAll(open){document.querySelectorAll('details').forEach(function(d){d.open=open;});}
var rbOpen=null;
window.addEventListener('beforeprint',function(){rbOpen=[];document.querySelectorAll('details').forEach(function(d){rbOpen.push(d.open);d.open=true;});});
window.addEventListener('afterprint',function(){if(!rbOpen)return;document.querySelectorAll('details').forEach(function(d,i){d.open=rbOpen[i];});rbOpen=null;});
if(location.hash){var t=document.getElementById(location.hash.slice(1));if(t&&t.tagName==='DETAILS'){t.open=true;}}
document.querySelectorAll('a[href^="#step-"]').forEach(function(a){a.addEventListener('click',function(){var t=document.getElementById(a.getAttribute('href').slice(1));if(t&&t.tagName==='DETAILS'){t.open=true;}});});
